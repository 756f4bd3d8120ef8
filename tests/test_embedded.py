"""`make run` on the embedded default, end to end, as a newcomer would use it.

No DATABASE_URL and no REDIS_URL: SQLite under a private var dir and kombu's
filesystem broker. The test registers over HTTP, sees the worker pick up the
verification email task (the null provider writes it to the log), verifies with the
token it carried, logs in, and checks Flower answers. Waiting is on conditions
(a port answering, a log line appearing), never on a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.helpers import PASSWORD

STARTUP_DEADLINE = 90.0


def _wait_until(predicate, deadline: float, what: str, log: Path):
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)  # polling a condition, not timing behaviour
    pytest.fail(f"timed out waiting for {what}; output:\n{log.read_text()[-4000:]}")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.RequestException:
        return False


@pytest.fixture
def embedded_herald(tmp_path):
    api_port, flower_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "EMAIL_PROVIDER", "SMTP_HOST", "SMTP_PORT"}
        and not key.startswith(("LOGIN_", "MAKE", "MFLAGS"))
    }
    env.update(
        HERALD_ENV="development",
        HERALD_VAR_DIR=str(tmp_path / "var"),
        HERALD_BIND=f"127.0.0.1:{api_port}",
        FLOWER_PORT=str(flower_port),
        PUBLIC_BASE_URL=f"http://127.0.0.1:{api_port}",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield {
            "api": f"http://127.0.0.1:{api_port}",
            "flower": f"http://127.0.0.1:{flower_port}",
            "log": log,
            "var": tmp_path / "var",
        }
    finally:
        # Ctrl-C, as a person would; honcho stops every process it started.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_make_run_embedded_default_end_to_end(embedded_herald):
    api, log = embedded_herald["api"], embedded_herald["log"]
    deadline = time.monotonic() + STARTUP_DEADLINE
    _wait_until(lambda: _answers(f"{api}/healthz"), deadline, "the API", log)
    ready = requests.get(f"{api}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text

    email = "newcomer@example.com"
    registered = requests.post(
        f"{api}/api/v1/auth/register", json={"email": email, "password": PASSWORD}, timeout=10
    )
    assert registered.status_code == 201, registered.text

    # The worker ran the task: the null provider logged the email, token included.
    def token_in_log():
        match = re.search(r"verification token: (\S+)", log.read_text(errors="replace"))
        return match.group(1) if match else None

    token = _wait_until(token_in_log, time.monotonic() + 60, "the worker to send the email", log)
    assert "Task herald.send_system_email" in log.read_text(errors="replace")

    verified = requests.post(f"{api}/api/v1/auth/verify", json={"token": token}, timeout=10)
    assert verified.status_code == 200, verified.text
    tokens = requests.post(
        f"{api}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10
    ).json()
    me = requests.get(
        f"{api}/api/v1/auth/me",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    )
    assert me.status_code == 200 and me.json()["is_verified"] is True

    assert (embedded_herald["var"] / "herald.sqlite3").exists()
    _wait_until(lambda: _answers(embedded_herald["flower"]), time.monotonic() + 30, "Flower", log)
    assert "beat" in log.read_text(errors="replace")

    # A campaign, launched, is planned and sent by the worker through the null provider
    # and completed by beat's reconciliation, all on SQLite and the filesystem broker.
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}

    def post(path: str, body: dict) -> dict:
        response = requests.post(f"{api}/api/v1{path}", json=body, headers=auth, timeout=10)
        assert response.status_code in (200, 201), (path, response.text)
        return response.json()

    for i in range(3):
        post("/contacts", {"email": f"reader{i}@example.com", "consent": {"email": True}})
    post("/contacts", {"email": "no-consent@example.com"})
    campaign = post("/campaigns", {"name": "Embedded launch"})
    cid = campaign["id"]
    post(
        f"/campaigns/{cid}/channels",
        {"channel_type": "email", "config": {"subject": "Hi {{ contact.email }}", "text": "Hello"}},
    )
    post(f"/campaigns/{cid}/audiences", {"name": "everyone", "definition": {"all": []}})
    assert post(f"/campaigns/{cid}/launch", {})["status"] == "running"

    def completed():
        body = requests.get(f"{api}/api/v1/campaigns/{cid}", headers=auth, timeout=10).json()
        return body if body["status"] == "completed" else None

    finished = _wait_until(completed, time.monotonic() + 90, "the campaign to complete", log)
    assert finished["channels"][0]["sent_count"] == 3
    log_rows = requests.get(
        f"{api}/api/v1/campaigns/{cid}/deliveries", headers=auth, timeout=10
    ).json()["items"]
    assert sorted(row["address"] for row in log_rows) == [
        f"reader{i}@example.com" for i in range(3)
    ]
    assert {row["status"] for row in log_rows} == {"sent"}
