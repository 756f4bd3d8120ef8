"""Claiming a batch's rows: queued → sending under a lease, with what sending them needs.

A claim is the durable mark "these may have been sent" (engine.dispatch.sending says
why it commits before any provider call). With it come the two reads that depend on
the claimed rows: the suppressions added since planning (those rows become suppressed
instead) and the contact columns the templates read.

A batch of a few hundred rows is claimed in two steps when it can be: the first chunk
(the calls up to the first checkpoint) in line, the rest on the worker's helper thread
while that chunk's calls go out (ClaimAhead). Claiming, suppressing and loading 500
rows cost tens of milliseconds a batch with nothing sent meanwhile, most of it
PostgreSQL writing the rows and their index entries; claimed ahead, only a tenth of it
stands before the first call. The rest's claim does not re-check the campaign: the
first chunk's did, and the first checkpoint re-checks it before any of the rest is
sent, handing them back if it was paused or cancelled since, as for a batch claimed at
once. Until it is collected the rest is still queued, owned by the batch task that is
running, as every row is between its dispatch and its claim.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    Uuid,
    and_,
    any_,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from engine.campaigns.rendering import CompiledChannel
from engine.db import session_scope
from engine.dispatch.helper_thread import helper_thread
from engine.dispatch.messages import contact_columns_read
from engine.dispatch.recording import BatchRun, ClaimedRow
from engine.models import Campaign, Contact, Delivery, Suppression

log = logging.getLogger("herald.dispatch.claiming")

deliveries = Delivery.__table__


@dataclass
class Claim:
    """Rows claimed to be sent (in id order), with the contacts they are addressed to."""

    rows: list[ClaimedRow] = field(default_factory=list)
    suppressed: int = 0
    contacts: dict[uuid.UUID, Any] = field(default_factory=dict)
    # When the limit was reached: the highest id claimed (suppressed ones included),
    # past which rows of the range may remain. None: the range has nothing left.
    more_after: int | None = None

    def count_into(self, batch: BatchRun) -> None:
        batch.add("claimed", len(self.rows) + self.suppressed)
        batch.add("suppressed", self.suppressed)


def claim(
    session: Session,
    batch: BatchRun,
    compiled: CompiledChannel,
    first_id: int,
    last_id: int,
    now: datetime,
    *,
    limit: int | None = None,
    while_running: bool = True,
) -> Claim:
    """Claim the channel's due queued rows with first_id <= id <= last_id (the `limit`
    lowest of them, if given), drop the suppressed ones, read their contacts."""
    claimed = _claim_rows(session, batch, first_id, last_id, now, limit, while_running)
    suppressed = _suppress(session, batch, claimed)
    rows = [row for row in claimed if row.id not in suppressed]
    contacts = _contacts(session, batch, compiled, [r.contact_id for r in rows if r.contact_id])
    return Claim(
        rows=rows,
        suppressed=len(suppressed),
        contacts=contacts,
        more_after=claimed[-1].id if limit is not None and len(claimed) == limit else None,
    )


class ClaimAhead:
    """The rest of a batch (past `after_id`), claimed on the helper thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        batch: BatchRun,
        compiled: CompiledChannel,
        after_id: int,
        last_id: int,
        now: datetime,
    ) -> None:
        snapshot = dataclasses.replace(batch, counts={})  # the lease it claims under
        self._future: Future[Claim] | None = helper_thread().submit(
            self._claim, session_factory, snapshot, compiled, after_id + 1, last_id, now
        )

    @staticmethod
    def _claim(
        session_factory: sessionmaker[Session],
        batch: BatchRun,
        compiled: CompiledChannel,
        first_id: int,
        last_id: int,
        now: datetime,
    ) -> Claim:
        with session_scope(session_factory) as session:
            return claim(session, batch, compiled, first_id, last_id, now, while_running=False)

    def collect(self) -> Claim:
        """The rest's claim, once: waits for it if it is still under way. A claim that
        failed (PostgreSQL down) committed nothing: its rows are still queued, and
        reconciliation dispatches them again once their dispatch grace is over. What
        interrupts the wait itself (the soft time limit's signal) propagates, and the
        claim can still be collected, to be handed back."""
        if self._future is None:
            return Claim()
        failure = self._future.exception()  # waits
        future, self._future = self._future, None
        if failure is not None:
            log.warning(
                "claiming the rest of a batch failed; its rows stay queued", exc_info=failure
            )
            return Claim()
        return future.result()


def _claim_rows(
    session: Session,
    batch: BatchRun,
    first_id: int,
    last_id: int,
    now: datetime,
    limit: int | None,
    while_running: bool,
) -> list[ClaimedRow]:
    # The hot claim. SKIP LOCKED lets two workers handed overlapping ranges (a batch
    # re-dispatched by reconciliation while the first copy still runs) split the rows
    # instead of queueing behind each other; status = 'queued' makes a redelivered task
    # claim nothing; the EXISTS re-checks the campaign in the same statement, so a
    # campaign paused or cancelled since the batch was enqueued claims nothing. With a
    # limit, the lowest ids go first (the channel/status/id index hands them over in
    # that order), so the rest of the range is what is left past the last one.
    # attempts counts claims: the CAS token of every later write, and the retry budget.
    # SQLite (embedded, one worker) has no FOR UPDATE; SQLAlchemy leaves it out there.
    conditions = [
        Delivery.campaign_channel_id == batch.channel_id,
        Delivery.id.between(first_id, last_id),
        Delivery.status == "queued",
        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
    ]
    if while_running:
        conditions.append(
            exists().where(Campaign.id == batch.campaign_id, Campaign.status == "running")
        )
    due = select(Delivery.id).where(*conditions)
    if limit is not None:
        due = due.order_by(Delivery.id).limit(limit)
    rows = session.execute(
        update(deliveries)
        .where(deliveries.c.id.in_(due.with_for_update(skip_locked=True).scalar_subquery()))
        .values(
            status="sending",
            lease_expires_at=batch.lease,
            attempts=deliveries.c.attempts + 1,
        )
        .returning(
            deliveries.c.id, deliveries.c.contact_id, deliveries.c.address, deliveries.c.attempts
        )
    ).all()
    return sorted((ClaimedRow(*row) for row in rows), key=lambda row: row.id)


def _suppress(session: Session, batch: BatchRun, claimed: list[ClaimedRow]) -> set[int]:
    """Rows whose address was suppressed since planning: suppressed, never attempted."""
    if not claimed:
        return set()
    if batch.channel_type == "email":  # email suppressions match whatever the case
        same_address = func.lower(Suppression.address) == func.lower(deliveries.c.address)
    else:
        same_address = Suppression.address == deliveries.c.address
    suppressed = exists().where(
        Suppression.user_id == batch.user_id,
        Suppression.channel == batch.channel_type,
        same_address,
    )
    rows = session.execute(
        update(deliveries)
        .where(ours(batch, claimed), suppressed)
        .values(status="suppressed", lease_expires_at=None, attempts=deliveries.c.attempts - 1)
        .returning(deliveries.c.id)
    ).all()
    return {row.id for row in rows}


def _contacts(
    session: Session, batch: BatchRun, compiled: CompiledChannel, contact_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Any]:
    if not contact_ids:
        return {}
    # Only the columns the message reads (as batch_sending does): decoding the rest,
    # JSON attributes and timestamps above all, was most of this query's cost.
    wanted_columns = contact_columns_read(compiled) | {"id"}
    table = Contact.__table__
    if batch.dialect == "postgresql":
        wanted = Contact.id == any_(bindparam("ids", contact_ids, type_=ARRAY(Uuid)))
    else:
        wanted = Contact.id.in_(contact_ids)
    # Through the connection, not the Session: plain rows, without the ORM's loading
    # machinery (which cost more than the query, 500 contacts a batch).
    columns = [table.c[name] for name in sorted(wanted_columns)]
    rows = session.connection().execute(select(*columns).where(wanted))
    return {row.id: row for row in rows}


# A batch names its rows (up to 500) in every statement. On PostgreSQL they travel as
# arrays: an IN list would be expanded by SQLAlchemy into one parameter per value and
# re-parsed by psycopg each time (a new statement text for every batch size), which
# cost more client CPU than the statements' work. SQLite has no arrays; it keeps IN.
_OURS_ARRAYS = text(
    "(deliveries.id, deliveries.attempts) IN "
    "(SELECT * FROM unnest(CAST(:ours_ids AS bigint[]), CAST(:ours_attempts AS integer[])))"
)


def ours(batch: BatchRun, rows: Sequence[ClaimedRow]):
    """The compare-and-set that makes a write touch only rows this batch still owns."""
    if batch.dialect == "postgresql":
        named = _OURS_ARRAYS.bindparams(
            ours_ids=[r.id for r in rows], ours_attempts=[r.attempts for r in rows]
        )
    else:
        named = tuple_(deliveries.c.id, deliveries.c.attempts).in_(
            [(r.id, r.attempts) for r in rows]
        )
    return and_(
        named,
        deliveries.c.status == "sending",
        deliveries.c.lease_expires_at == batch.lease,
    )
