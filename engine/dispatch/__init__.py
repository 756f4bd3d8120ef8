"""The dispatch engine: from a due campaign to batch tasks, and back to "completed".

    promotion       scheduled → running, one compare-and-set for every due campaign
    planning        a running campaign's channels → queued deliveries → batch ranges
                    (its batcher also serves reconciliation)
    completion      planned channels with nothing left → done; all done → completed
    reconciliation  what the broker forgot (Redis keeps nothing on disk), found again
                    in PostgreSQL: unplanned channels, expired leases, due retries,
                    stale dispatches, cancelled campaigns
    sending         claims a batch's rows and calls the providers (its own module)

Everything here is a function over a Session that never commits, and takes `now` from
the caller's clock. The Celery tasks in workers/tasks/ commit, and only then enqueue
the batches these functions decide, so a worker never sees a range that isn't there.
"""
