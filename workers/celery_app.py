"""The Celery application, built from the engine's settings.

Delivery on Redis is at least once, so every task is written to be repeatable, and the
settings below make a crash redeliver rather than lose: acks after the task ran, one
message prefetched per process, and a hard time limit well below the visibility
timeout so a slow task is killed before Redis hands its message to someone else.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from engine.settings import QUEUES, Settings

VISIBILITY_TIMEOUT = 3600
TASK_HARD_TIME_LIMIT = 600
TASK_SOFT_TIME_LIMIT = 540

# Task names are stable strings (not module paths) so moving code never strands
# messages already sitting in a queue.
TASK_ROUTES = {
    "herald.email.*": {"queue": "email"},
    "herald.sms.*": {"queue": "sms"},
    "herald.push.*": {"queue": "push"},
    "herald.whatsapp.*": {"queue": "whatsapp"},
    "herald.sync.*": {"queue": "sync"},
    "herald.*": {"queue": "default"},
}


def broker_options(settings: Settings) -> dict:
    if not settings.embedded:
        return {"visibility_timeout": VISIBILITY_TIMEOUT}
    # kombu's filesystem transport: the embedded default's broker, no server needed.
    # One folder serves as both inbox and outbox, so producer and worker meet there.
    folder = settings.broker_folder
    for sub in ("queue", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("herald", set_as_current=True)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        task_default_queue="default",
        task_default_exchange="default",
        task_default_routing_key="default",
        task_routes=TASK_ROUTES,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Celery 6 will cancel running tasks when the broker connection drops; a send
        # batch must finish (and record) across a Redis blip instead.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=TASK_HARD_TIME_LIMIT,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    return app


def beat_schedule(settings: Settings) -> dict:
    # The schedule lives in code; beat's state file (celerybeat-schedule) is runtime
    # state and gitignored. Every scheduled task is idempotent, so a second beat run
    # by mistake repeats work but never duplicates an effect.
    return {
        "promote-due-campaigns": {
            "task": "herald.promote_due",
            "schedule": settings.beat_tick,
            "options": {"expires": _stale_after(settings.beat_tick)},
        },
        "reconcile-dispatch": {
            "task": "herald.reconcile",
            # Reconciliation re-finds work the broker lost; every few seconds bounds how
            # long a Redis restart or a dead worker can delay a campaign, at the cost of
            # a few indexed queries per run.
            "schedule": settings.reconcile_interval,
            "options": {"expires": _stale_after(settings.reconcile_interval)},
        },
        # Status callbacks that beat the sender's checkpoint wait as orphans; the last
        # callback of a message has nobody after it to adopt it, so beat does.
        "adopt-orphan-events": {
            "task": "herald.adopt_orphan_events",
            "schedule": 30.0,
        },
        "purge-expired-tokens": {
            "task": "herald.purge_expired_tokens",
            "schedule": 3600.0,
        },
        "resume-stalled-imports": {
            "task": "herald.sync.resume_stalled_imports",
            "schedule": 60.0,
        },
    }


def _stale_after(interval: float) -> float:
    """Seconds after which a tick's task is dropped unrun. A worker busy with send
    batches lets these pile up (one per tick) and then runs them back to back; each is
    idempotent, so only the newest matters. Generous, so a busy queue delays a
    promotion but can never starve it."""
    return max(60.0, 10 * interval)
