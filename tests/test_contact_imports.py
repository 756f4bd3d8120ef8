"""CSV imports: the streamed upload, the batch step's checkpoint, and the whole path
through a real Celery worker on Redis and PostgreSQL."""

from __future__ import annotations

import io
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from engine.contacts.csv_import import mark_import_failed, run_import_batch
from engine.models import Contact, ContactImport, ContactImportRow
from tests.helpers import assert_error

URL = "/api/v1/contacts/imports"
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def upload(client, account, content: bytes | str, filename: str = "contacts.csv", **extra):
    if isinstance(content, str):
        content = content.encode()
    data = {**extra, "file": (io.BytesIO(content), filename)}
    return client.post(
        URL, data=data, headers=account["headers"], content_type="multipart/form-data"
    )


def count(session, model) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(model))


def wait_until_finished(client, account, import_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{URL}/{import_id}", headers=account["headers"]).get_json()
        if job["status"] in ("completed", "failed"):
            return job
        assert time.monotonic() < deadline, f"import still {job['status']}: {job}"
        time.sleep(0.1)  # polling a condition, not timing behaviour


def big_csv(rows: int) -> tuple[str, dict[int, str]]:
    """A CSV with a BOM, a blank line, a quoted multi-line cell and some bad rows; returns
    it and the field each bad row must be rejected on."""
    bad: dict[int, str] = {}
    lines = ["external_id,Email,phone,first_name,consent_email,push_tokens,plan,attributes.city"]
    for i in range(1, rows + 1):
        email, phone, consent, extra = f"user{i}@example.com", f"+3361234{i:04d}", "yes", ""
        if i % 500 == 0:
            email, bad[i] = "broken@", "email"
        elif i == 777:
            phone, bad[i] = "12", "phone"
        elif i == 1234:
            consent, bad[i] = "maybe", "consent.email"
        elif i == 2001:
            extra, bad[i] = ",surplus", "row"
        name = '"Ada, ""the first""\nLovelace"' if i == 3 else f"Name {i}"
        lines.append(f"c-{i:05d},{email},{phone},{name},{consent},tok-{i}|tok-{i},pro,Paris{extra}")
        if i == 1500:
            lines.append("")
    return "\ufeff" + "\r\n".join(lines) + "\r\n", bad


def test_a_csv_import_runs_end_to_end_through_a_worker(client, alice, db_session, celery_worker):
    existing = client.post(
        "/api/v1/contacts",
        json={"external_id": "c-00010", "first_name": "Old", "consent": {"sms": True}},
        headers=alice["headers"],
    ).get_json()
    content, bad = big_csv(3000)

    response = upload(client, alice, content)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["status"], job["total_rows"], job["filename"]) == ("queued", 3000, "contacts.csv")

    job = wait_until_finished(client, alice, job["id"])
    assert job["status"] == "completed", job
    assert job["rows_done"] == job["total_rows"] == 3000
    assert (job["created"], job["updated"], job["rejected"]) == (3000 - len(bad) - 1, 1, len(bad))
    assert [(e["row"], set(e["errors"])) for e in job["errors"]] == [
        (row, {field}) for row, field in sorted(bad.items())
    ]
    assert job["finished_at"] is not None

    assert count(db_session, Contact) == 3000 - len(bad)
    assert count(db_session, ContactImportRow) == 0
    updated = db_session.get(Contact, uuid.UUID(existing["id"]))
    assert updated.first_name == "Name 10"
    assert (updated.consent_sms, updated.consent_email) == (True, True)
    assert updated.email == "user10@example.com"
    third = db_session.scalar(select(Contact).where(Contact.external_id == "c-00003"))
    assert third.first_name == 'Ada, "the first"\nLovelace'
    assert third.phone == "+33612340003"
    assert third.push_tokens == ["tok-3"]
    assert third.attributes == {"plan": "pro", "city": "Paris"}

    listed = client.get(URL, headers=alice["headers"]).get_json()
    assert [item["id"] for item in listed["items"]] == [job["id"]]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty"),
        ("first_name,plan\nAda,pro\n", "external_id or an email"),
        ("email,EMAIL\na@example.com,b@example.com\n", "twice"),
        ("email,phone\n", "no rows"),
        (b"email\n\xff\xfe@example.com\n", "UTF-8"),
    ],
)
def test_bad_files_answer_422_and_stage_nothing(client, alice, db_session, content, problem):
    error = assert_error(upload(client, alice, content), 422, "validation_error", "file")
    assert problem in error["fields"]["file"][0]
    assert count(db_session, ContactImport) == 0
    assert count(db_session, ContactImportRow) == 0


def test_the_upload_must_be_multipart_with_only_a_file_field(client, alice, db_session):
    response = client.post(URL, json={"file": "email\na@example.com"}, headers=alice["headers"])
    assert_error(response, 422, "validation_error", "file")
    response = client.post(
        URL, data={"note": "hi"}, headers=alice["headers"], content_type="multipart/form-data"
    )
    assert_error(response, 422, "validation_error", "note")
    response = client.post(
        URL, data={}, headers=alice["headers"], content_type="multipart/form-data"
    )
    assert_error(response, 422, "validation_error", "file")
    assert_error(
        upload(client, alice, "email\na@example.com\n", delimiter=";"),
        422,
        "validation_error",
        "delimiter",
    )
    two_files = {
        "file": (io.BytesIO(b"email\na@example.com\n"), "first.csv"),
        "other": (io.BytesIO(b"email\nb@example.com\n"), "second.csv"),
    }
    response = client.post(
        URL, data=two_files, headers=alice["headers"], content_type="multipart/form-data"
    )
    assert_error(response, 422, "validation_error", "other")
    assert count(db_session, ContactImport) == 0


def waiting_on_a_lock(session) -> bool:
    session.rollback()
    return bool(
        session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    )


def staged_import(client, account, rows: list[str]) -> uuid.UUID:
    """An import staged through the API; no worker runs, so tests drive the batches."""
    response = upload(client, account, "external_id,email\n" + "\n".join(rows) + "\n")
    assert response.status_code == 202, response.get_json()
    return uuid.UUID(response.get_json()["id"])


def test_the_batch_step_resumes_from_its_checkpoint_and_is_idempotent(app, client, alice):
    from api.extensions import db

    rows = [f"e-{i},person{i}@example.com" for i in range(1, 11)]
    rows[5] = "e-6,not-an-email"
    import_id = staged_import(client, alice, rows)

    def batch(commit: bool = True) -> bool:
        session = db.factory()
        try:
            more = run_import_batch(session, import_id, NOW, batch_size=4)
            session.commit() if commit else session.rollback()
            return more
        finally:
            session.close()

    def state(session) -> tuple:
        session.expire_all()
        job = session.get(ContactImport, import_id)
        return (job.status, job.rows_done, job.created_count, job.rejected_count)

    session = db.factory()
    assert batch(commit=False) is True  # a worker that died before committing
    assert state(session) == ("queued", 0, 0, 0)
    assert count(session, Contact) == 0

    assert batch() is True
    assert state(session) == ("running", 4, 4, 0)
    assert count(session, ContactImportRow) == 6
    assert batch() is True
    assert state(session) == ("running", 8, 7, 1)
    assert batch() is False
    assert state(session) == ("completed", 10, 9, 1)
    assert session.get(ContactImport, import_id).finished_at == NOW

    # Run again (a redelivered task): nothing moves, nothing is counted twice.
    assert batch() is False
    assert state(session) == ("completed", 10, 9, 1)
    assert count(session, Contact) == 9
    assert session.get(ContactImport, import_id).errors == [
        {"row": 6, "errors": {"email": ["Not a valid email address."]}}
    ]
    session.close()


def test_two_runs_of_one_import_take_turns_instead_of_repeating_a_batch(app, client, alice):
    from api.extensions import db

    import_id = staged_import(client, alice, [f"e-{i},p{i}@example.com" for i in range(1, 9)])
    first = db.factory()
    assert run_import_batch(first, import_id, NOW, batch_size=4) is True  # holds the job lock
    finished = threading.Event()

    def second_run():
        session = db.factory()
        run_import_batch(session, import_id, NOW, batch_size=4)
        session.commit()
        session.close()
        finished.set()

    thread = threading.Thread(target=second_run)
    thread.start()
    observer = db.factory()
    deadline = time.monotonic() + 10
    while not waiting_on_a_lock(observer):
        assert time.monotonic() < deadline, "the second run never waited for the job lock"
        time.sleep(0.02)  # polling a condition
    observer.close()
    assert not finished.is_set()
    first.commit()
    first.close()
    thread.join(10)
    session = db.factory()
    job = session.get(ContactImport, import_id)
    assert (job.status, job.rows_done, job.created_count, job.updated_count) == (
        "completed",
        8,
        8,
        0,
    )
    session.close()


def test_a_failed_import_says_why_and_drops_its_staging_rows(app, client, alice):
    from api.extensions import db

    import_id = staged_import(client, alice, ["e-1,a@example.com"])
    session = db.factory()
    mark_import_failed(session, import_id, "worker gave up", NOW)
    session.commit()
    assert count(session, ContactImportRow) == 0
    session.close()
    job = client.get(f"{URL}/{import_id}", headers=alice["headers"]).get_json()
    assert job["status"] == "failed"
    assert job["errors"] == [{"row": None, "errors": {"import": ["worker gave up"]}}]


def test_imports_are_private_to_their_user(client, alice, bob):
    import_id = staged_import(client, alice, ["e-1,a@example.com"])
    assert_error(client.get(f"{URL}/{import_id}", headers=bob["headers"]), 404, "not_found")
    assert_error(client.get(f"{URL}/{uuid.uuid4()}", headers=alice["headers"]), 404, "not_found")
    assert client.get(URL, headers=bob["headers"]).get_json() == {"items": [], "next_cursor": None}
    page = client.get(URL, query_string={"limit": 1}, headers=alice["headers"]).get_json()
    assert [item["id"] for item in page["items"]] == [str(import_id)]
    assert_error(client.get(URL), 401, "unauthorized")


def test_ragged_and_nul_rows_are_rejected_with_their_row_number(app, client, alice):
    from api.extensions import db

    import_id = staged_import(
        client,
        alice,
        ["e-1,a@example.com", "e-2,b@example.com,surplus", "e-3,c\x00@example.com", "e-4,,"],
    )
    session = db.factory()
    assert run_import_batch(session, import_id, NOW) is False
    session.commit()
    job = session.get(ContactImport, import_id)
    assert (job.created_count, job.rejected_count, job.total_rows) == (2, 2, 4)
    assert job.errors == [
        {"row": 2, "errors": {"row": ["Has 3 cells; the header names 2 columns."]}},
        {"row": 3, "errors": {"row": ["Contains a NUL character."]}},
    ]
    session.close()


def test_beat_resumes_an_import_whose_task_was_lost(client, alice, db_session, request):
    """The enqueue after the upload is lost (here: the queue is emptied before any
    worker runs); beat's sweep finds the stalled import in PostgreSQL and finishes it."""
    from datetime import timedelta

    import redis as redis_client

    from engine.contacts.csv_import import stalled_imports
    from tests.conftest import TEST_REDIS_URL
    from workers.tasks.imports import STALL_GRACE, resume_stalled_imports_task

    response = upload(client, alice, "email\nlost1@example.com\nlost2@example.com\n")
    assert response.status_code == 202, response.get_json()
    job_id = uuid.UUID(response.get_json()["id"])
    # Whatever reached the broker is gone, as after a Redis restart.
    assert redis_client.Redis.from_url(TEST_REDIS_URL).delete("sync") == 1
    db_session.execute(
        text("UPDATE contact_imports SET updated_at = updated_at - interval '1 hour'")
    )
    db_session.commit()

    now = datetime.now(UTC)
    assert stalled_imports(db_session, now, STALL_GRACE) == [job_id]
    assert stalled_imports(db_session, now, timedelta(days=1)) == []

    request.getfixturevalue("celery_worker")  # only now does a worker run
    assert resume_stalled_imports_task.apply().get() == 1
    finished = wait_until_finished(client, alice, str(job_id))
    assert (finished["status"], finished["created"]) == ("completed", 2)
