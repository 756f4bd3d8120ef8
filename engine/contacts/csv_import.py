"""CSV contact imports: the upload streamed into staging, then upserted in batches.

Staging. The request parses the CSV as it arrives (csv over a text stream of the upload,
never the whole file in memory) and COPYs each row into contact_import_rows as a JSON
object keyed by the column's canonical name, numbered 1, 2, 3… in file order. The API
and the workers share no disk, so PostgreSQL is where the file waits; COPY is the
fastest way in and costs one round trip per ~64 KB, not one per row.

Batches. A sync worker then takes the next rows after `rows_done`, runs them through
the same validation and set-based upsert as POST /contacts/bulk, and in the same
transaction advances the job's counters by compare-and-set on `rows_done` and deletes
the staging rows it consumed. A redelivered or re-run task therefore resumes from the
last committed batch and never counts a row twice.

Columns (header names are trimmed and matched case-insensitively):
  external_id, email, phone, whatsapp, first_name, last_name, timezone, locale;
  push_tokens, several tokens separated by "|";
  consent_email, consent_sms, consent_push, consent_whatsapp (or consent.email, …):
    true/false, yes/no, y/n, t/f or 1/0;
  attributes.<name> sets attribute <name>; any other column sets an attribute named
  after it. Attribute values are strings.
An empty cell means "no value given": an update leaves that field as it is. Columns
without a header name are ignored. Blank lines are skipped and not numbered.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from engine.contacts.upsert import REJECTED, upsert_contacts
from engine.contacts.validation import CONSENT_CHANNELS, JSON_NUL_RE, validate_contact
from engine.errors import DomainError, ValidationFailed
from engine.models import ContactImport, ContactImportRow

BATCH_SIZE = 5000
MAX_KEPT_ERRORS = 100
MAX_FILENAME = 255

# The key a staged row carries instead of its cells when the row itself is malformed;
# no column maps to an empty name, so it cannot collide.
MALFORMED = ""
_ATTRIBUTE_PREFIX = "attributes."
_CONSENT_PREFIX = "consent."
_PLAIN_COLUMNS = frozenset(
    {"external_id", "email", "phone", "whatsapp", "first_name", "last_name", "timezone", "locale"}
)
_KEY_COLUMNS = ("external_id", "email")
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})

_COPY_SQL = "COPY contact_import_rows (import_id, row_number, data) FROM STDIN"


# -- staging (runs in the API request) ------------------------------------------------


def stage_upload(
    session: Session, user_id: uuid.UUID, filename: str | None, upload: IO[bytes]
) -> ContactImport:
    """Create the import job and COPY every row of `upload` (a binary stream of UTF-8
    CSV) into staging. The job is `queued` when this returns; the caller commits and
    only then enqueues the worker."""
    if session.get_bind().dialect.name != "postgresql":
        raise DomainError("CSV imports need PostgreSQL", code="postgresql_required")
    job = ContactImport(user_id=user_id, filename=(filename or None) and filename[:MAX_FILENAME])
    session.add(job)
    session.flush()
    # utf-8-sig reads plain UTF-8 and also drops the byte-order mark Excel writes.
    text = io.TextIOWrapper(upload, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        keys = column_keys(next(reader, None))
        total = _copy_rows(session, job.id, keys, reader)
    except UnicodeDecodeError:
        raise _file_error(f"is not UTF-8 text (near line {reader.line_num + 1})") from None
    except csv.Error as exc:
        raise _file_error(f"is not valid CSV at line {reader.line_num}: {exc}") from None
    if total == 0:
        raise _file_error("has a header but no rows")
    job.total_rows = total
    job.status = "queued"
    session.flush()
    return job


def column_keys(header: list[str] | None) -> list[str | None]:
    """The staging key of each column ("email", "consent.sms", "attributes.plan"), or
    None for a column without a name."""
    if not header:
        raise _file_error("is empty; the first line must name the columns")
    keys: list[str | None] = []
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        key = _column_key(name)
        if key is not None and key in seen:
            raise _file_error(f"names column {key!r} twice (column {position})")
        if key is not None:
            seen.add(key)
        keys.append(key)
    if not seen.intersection(_KEY_COLUMNS):
        raise _file_error("needs an external_id or an email column to match contacts on")
    return keys


def _column_key(name: str) -> str | None:
    name = name.strip()
    lowered = name.lower()
    if not name:
        return None
    if lowered in _PLAIN_COLUMNS or lowered == "push_tokens":
        return lowered
    for channel in CONSENT_CHANNELS:
        if lowered in (f"consent_{channel}", f"consent.{channel}"):
            return f"{_CONSENT_PREFIX}{channel}"
    if lowered.startswith(_ATTRIBUTE_PREFIX):
        name = name[len(_ATTRIBUTE_PREFIX) :].strip()
        if not name:
            raise _file_error("has a column named 'attributes.' without an attribute name")
    return _ATTRIBUTE_PREFIX + name


def _copy_rows(
    session: Session, import_id: uuid.UUID, keys: list[str | None], reader: Iterable[list[str]]
) -> int:
    width = len(keys)
    named = [(position, key) for position, key in enumerate(keys) if key is not None]
    dbapi = session.connection().connection.driver_connection
    row_number = 0
    with dbapi.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        for cells in reader:
            document = _staged_document(cells, width, named)
            if document is None:
                continue
            row_number += 1
            copy.write_row((import_id, row_number, document))
    return row_number


def _staged_document(cells: list[str], width: int, named: list[tuple[int, str]]) -> str | None:
    """The row as JSON text for staging; None for a row with nothing in it."""
    count = len(cells)
    values = {key: cells[i] for i, key in named if i < count and cells[i].strip()}
    if count > width and any(cell.strip() for cell in cells[width:]):
        values = {MALFORMED: f"Has {count} cells; the header names {width} columns."}
    elif not values:
        return None
    document = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    if JSON_NUL_RE.search(document):
        # jsonb cannot hold NUL; keep the row (so numbering matches the file) as a reject.
        document = json.dumps({MALFORMED: "Contains a NUL character."})
    return document


def _file_error(problem: str) -> ValidationFailed:
    return ValidationFailed(f"the file {problem}", fields={"file": [f"The file {problem}."]})


# -- batches (run by the sync worker) -------------------------------------------------


class ImportCheckpointMoved(RuntimeError):
    """rows_done changed under a batch; its transaction must roll back."""


def run_import_batch(
    session: Session, import_id: uuid.UUID, now: datetime, *, batch_size: int = BATCH_SIZE
) -> bool:
    """Upsert the next batch of staged rows; True while rows remain.

    The job row is locked first, so a duplicate task for the same import waits here and
    then picks up after this batch instead of redoing it. The counters still advance by
    compare-and-set on rows_done: the write states which checkpoint it builds on.
    """
    job = session.scalar(
        select(ContactImport).where(ContactImport.id == import_id).with_for_update()
    )
    if job is None or job.status not in ("queued", "running"):
        return False
    rows = session.execute(
        select(ContactImportRow.row_number, ContactImportRow.data)
        .where(
            ContactImportRow.import_id == import_id,
            ContactImportRow.row_number > job.rows_done,
        )
        .order_by(ContactImportRow.row_number)
        .limit(batch_size)
    ).all()
    result = upsert_contacts(session, job.user_id, [judge_staged(row.data) for row in rows])

    errors = list(job.errors)
    for row, outcome in zip(rows, result.outcomes, strict=True):
        if outcome.status == REJECTED and len(errors) < MAX_KEPT_ERRORS:
            errors.append({"row": row.row_number, "errors": outcome.errors})
    done = rows[-1].row_number if rows else job.rows_done
    finished = not rows or done >= job.total_rows
    advanced = session.execute(
        update(ContactImport)
        .where(ContactImport.id == import_id, ContactImport.rows_done == job.rows_done)
        .values(
            rows_done=done,
            created_count=ContactImport.created_count + result.created,
            updated_count=ContactImport.updated_count + result.updated,
            rejected_count=ContactImport.rejected_count + result.rejected,
            errors=errors,
            status="completed" if finished else "running",
            finished_at=now if finished else None,
        )
        .execution_options(synchronize_session=False)
    )
    if advanced.rowcount != 1:
        # Another run moved the checkpoint: roll this batch back rather than count twice.
        raise ImportCheckpointMoved(import_id)
    session.execute(
        delete(ContactImportRow)
        .where(ContactImportRow.import_id == import_id, ContactImportRow.row_number <= done)
        .execution_options(synchronize_session=False)
    )
    if finished and session.get_bind().dialect.name == "postgresql":
        # Fresh statistics for the rows just added: without them (autovacuum off, or not
        # yet run) the planner picks whole-index scans for the contact lookups of the
        # campaign a marketer launches right after an import.
        session.execute(text("ANALYZE contacts"))
    return not finished


def stalled_imports(session: Session, now: datetime, grace: timedelta) -> list[uuid.UUID]:
    """Imports waiting for a worker that is not coming: queued or running, untouched for
    `grace`. The enqueue after the upload commits can be lost (Redis down, a restart
    emptying the queue); re-enqueueing is safe because a batch resumes from rows_done."""
    return list(
        session.scalars(
            select(ContactImport.id).where(
                ContactImport.status.in_(("queued", "running")),
                ContactImport.updated_at < now - grace,
            )
        )
    )


def mark_import_failed(session: Session, import_id: uuid.UUID, reason: str, now: datetime) -> None:
    """Give up on an import (a worker could not finish it): record why and drop its
    staging rows. A completed import is left as it is."""
    job = session.scalar(
        select(ContactImport).where(ContactImport.id == import_id).with_for_update()
    )
    if job is None or job.status in ("completed", "failed"):
        return
    job.status = "failed"
    job.finished_at = now
    job.errors = [*job.errors, {"row": None, "errors": {"import": [reason]}}]
    session.execute(
        delete(ContactImportRow)
        .where(ContactImportRow.import_id == import_id)
        .execution_options(synchronize_session=False)
    )
    session.flush()


def judge_staged(document: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A staged row as (clean, errors), exactly as validate_contact judges an API row."""
    if MALFORMED in document:
        return {}, {"row": [document[MALFORMED]]}
    contact: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for key, value in document.items():
        if key.startswith(_ATTRIBUTE_PREFIX):
            contact.setdefault("attributes", {})[key[len(_ATTRIBUTE_PREFIX) :]] = value
        elif key.startswith(_CONSENT_PREFIX):
            flag = value.strip().lower()
            if flag in _TRUE or flag in _FALSE:
                contact.setdefault("consent", {})[key[len(_CONSENT_PREFIX) :]] = flag in _TRUE
            else:
                errors[key] = ["Not a valid boolean."]
        elif key == "push_tokens":
            contact[key] = [token for token in value.split("|") if token.strip()]
        else:
            contact[key] = value
    clean, problems = validate_contact(contact)
    for path, messages in problems.items():
        errors.setdefault(path, []).extend(messages)
    return clean, errors
