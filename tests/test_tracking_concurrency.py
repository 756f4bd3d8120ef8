"""A thousand concurrent duplicate pixel hits (and clicks) move a counter by exactly one.

The app runs in a real threaded HTTP server on loopback (werkzeug's), and 1,000 client
threads released together by a barrier each GET the same tracked URL over their own TCP
connection, so the duplicates race inside PostgreSQL, not in a test client's queue.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import Counter

import pytest
from werkzeug.serving import make_server

from engine.tracking.opens import PIXEL_GIF
from tests.dispatch_helpers import assert_counters_match
from tests.test_tracking_endpoints import (  # noqa: F401
    BROWSER,
    SALE,
    clock_fixture,
    track_app_fixture,
    tracked_message,
)
from tests.tracking_helpers import channel_counts, delivery, events_of

CONCURRENT = 1000

pytestmark = pytest.mark.slow


@pytest.fixture
def server(track_app):
    """The app on a loopback port, one thread per connection; yields the port."""
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    httpd = make_server("127.0.0.1", 0, track_app, threaded=True)
    httpd.socket.listen(2048)  # the default backlog (128) would drop most of the burst
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    thread.join(timeout=10)
    quiet.setLevel(level)


def burst(port: int, requests: list[tuple[str, str]]) -> tuple[list, float]:
    """GET every (path, user agent) at once, one thread and connection each; the
    answers (status, Location or body) and the seconds from release to the last."""
    barrier = threading.Barrier(len(requests) + 1)
    answers: list = [None] * len(requests)

    def fetch(index: int, path: str, agent: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        barrier.wait()
        try:
            connection.request("GET", path, headers={"User-Agent": agent})
            response = connection.getresponse()
            body = response.read()
            answers[index] = (response.status, response.getheader("Location") or body)
        except Exception as exc:  # recorded, so the assertion shows what went wrong
            answers[index] = ("error", repr(exc))
        finally:
            connection.close()

    threading.stack_size(256 * 1024)
    try:
        threads = [
            threading.Thread(target=fetch, args=(i, *request)) for i, request in enumerate(requests)
        ]
        for thread in threads:
            thread.start()
    finally:
        threading.stack_size(0)
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join(timeout=180)
    return answers, time.monotonic() - started


def test_a_thousand_concurrent_duplicate_pixel_hits_count_once(
    server, db_session, alice, settings, capsys
):
    message = tracked_message(db_session, settings, alice["id"])

    answers, seconds = burst(server, [(message.pixel, BROWSER)] * CONCURRENT)

    assert Counter(answers) == Counter({(200, PIXEL_GIF): CONCURRENT})
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"]) == (1, 1)
    assert [(e.kind, e.machine) for e in events_of(db_session, message.sent.delivery_id)] == [
        ("opened", False)
    ]
    assert_counters_match(db_session)
    with capsys.disabled():
        print(f"\n{CONCURRENT} concurrent duplicate pixel hits: {seconds:.2f} s")


def test_a_thousand_concurrent_pixel_hits_half_by_apples_proxy_count_one_human(
    server, db_session, alice, settings
):
    message = tracked_message(db_session, settings, alice["id"])
    agents = ["Mozilla/5.0" if index % 2 else BROWSER for index in range(CONCURRENT)]

    answers, _ = burst(server, [(message.pixel, agent) for agent in agents])

    assert all(answer == (200, PIXEL_GIF) for answer in answers)
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"]) == (1, 1)
    events = events_of(db_session, message.sent.delivery_id)
    assert sorted((e.kind, e.machine) for e in events) == [("opened", False), ("opened", True)]
    assert_counters_match(db_session)


def test_a_thousand_concurrent_clicks_are_all_kept_and_count_once(
    server, db_session, alice, settings, capsys
):
    message = tracked_message(db_session, settings, alice["id"])

    answers, seconds = burst(server, [(message.clicks[0], BROWSER)] * CONCURRENT)

    assert Counter(answers) == Counter({(302, SALE): CONCURRENT})
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 1, 1)
    row = delivery(db_session, message.sent.delivery_id)
    assert row.delivered_at == row.opened_at == row.clicked_at
    events = events_of(db_session, message.sent.delivery_id)
    assert len(events) == CONCURRENT and all(e.kind == "clicked" for e in events)
    assert_counters_match(db_session)
    with capsys.disabled():
        print(f"{CONCURRENT} concurrent clicks on one link: {seconds:.2f} s")
