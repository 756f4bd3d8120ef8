"""The SMTP channel against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from email import message_from_bytes
from email import policy as email_policy

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from engine.channels import OutboundMessage, channel_for
from engine.channels.smtp import SmtpChannel
from engine.settings import Settings
from tests.providers.fixtures import (  # noqa: F401
    FAST_TIMEOUTS,
    STALL,
    channel_settings_fixture,
    secure_smtp_server_fixture,
    smtp_tls_fixture,
)
from tests.providers.smtp_sink import SmtpServer

UNSUBSCRIBE = "<http://herald.test/u/tok-41>"


def email(delivery_id: int = 41, to: str = "ada@example.com", **content) -> OutboundMessage:
    content = {"subject": "Spring sale", "text": "Hello Ada", **content}
    return OutboundMessage(delivery_id, f"d{delivery_id}", to, content)


@pytest.fixture(params=[True, False], ids=["pipelining", "stepwise"])
def smtp_server(request):
    """Every behaviour below holds on a relay with RFC 2920 PIPELINING (one write for
    MAIL, RCPT and DATA) and on one without (command by command)."""
    with SmtpServer(pipelining=request.param) as server:
        yield server


@pytest.fixture
def channel(smtp_server, channel_settings):
    channel = channel_for("email", smtp_server.settings(channel_settings), **FAST_TIMEOUTS)
    yield channel
    channel.close()


def test_sends_multipart_email_with_unsubscribe_headers(channel, smtp_server):
    message = email(
        subject="Spring sale, Ada",
        text="Plain words",
        html="<p>Rich <b>words</b></p>",
        from_email="news@shop.test",
        from_name="Shop News",
        reply_to="help@shop.test",
        headers={
            "List-Unsubscribe": UNSUBSCRIBE,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )

    result = channel.send(message)

    assert (result.outcome, result.error) == ("sent", None)
    assert result.provider_message_id == "<herald.d41@shop.test>"
    (received,) = smtp_server.wait_for(1)
    assert received.mail_from == "news@shop.test"
    assert received.rcpt_tos == ["ada@example.com"]
    mail = received.message
    assert mail["From"] == "Shop News <news@shop.test>"
    assert mail["To"] == "ada@example.com"
    assert mail["Reply-To"] == "help@shop.test"
    assert mail["Subject"] == "Spring sale, Ada"
    assert mail["Message-ID"] == "<herald.d41@shop.test>"
    assert mail["Date"] is not None
    assert mail["List-Unsubscribe"] == UNSUBSCRIBE
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_content_type() == "multipart/alternative"
    parts = {part.get_content_type(): part.get_content().strip() for part in mail.iter_parts()}
    assert parts == {"text/plain": "Plain words", "text/html": "<p>Rich <b>words</b></p>"}


def test_default_sender_comes_from_email_from(channel, smtp_server):
    assert channel.send(email(html="<p>only html</p>", text=None)).is_sent
    (received,) = smtp_server.wait_for(1)
    assert received.mail_from == "campaigns@herald.test"
    assert received.message["From"] == "Herald <campaigns@herald.test>"
    assert received.message["Message-ID"] == "<herald.d41@herald.test>"
    assert received.message.get_content_type() == "text/html"


def test_non_ascii_content_survives_on_a_7bit_relay(channel, smtp_server):
    message = email(subject="Café für Ünïcode", text="Grüße, Ada ✓", from_name="Zoë")
    assert channel.send(message).is_sent
    (received,) = smtp_server.wait_for(1)
    assert received.raw.isascii()  # encoded words and quoted-printable, no 8-bit data
    assert received.message["Subject"] == "Café für Ünïcode"
    assert received.message["From"].addresses[0].display_name == "Zoë"
    assert received.message.get_content().strip() == "Grüße, Ada ✓"


def test_a_resend_carries_the_same_message_id(smtp_server, channel_settings):
    settings = smtp_server.settings(channel_settings)
    for _ in range(2):  # two workers, or a retry after a crash
        with channel_for("email", settings, **FAST_TIMEOUTS) as channel:
            assert channel.send(email(delivery_id=7)).is_sent
    first, second = smtp_server.wait_for(2)
    assert first.message["Message-ID"] == second.message["Message-ID"] == "<herald.d7@herald.test>"


def test_one_session_serves_many_messages(channel, smtp_server):
    messages = [email(delivery_id=i, to=f"user{i}@example.com") for i in range(1, 6)]

    results = channel.send_many(messages)

    assert [r.outcome for r in results] == ["sent"] * 5
    assert [r.delivery_id for r in results] == [1, 2, 3, 4, 5]
    received = smtp_server.wait_for(5)
    assert smtp_server.connections == 1
    assert {m.connection for m in received} == {1}
    assert [m.rcpt_tos[0] for m in received] == [f"user{i}@example.com" for i in range(1, 6)]


def test_reconnects_once_when_the_server_dropped_the_idle_session(channel, smtp_server):
    assert channel.send(email(delivery_id=1)).is_sent
    assert smtp_server.drop_connections() == 1

    result = channel.send(email(delivery_id=2))

    assert (result.outcome, result.error) == ("sent", None)
    first, second = smtp_server.wait_for(2)
    assert (first.connection, second.connection) == (1, 2)
    assert smtp_server.connections == 2


def test_reconnects_once_when_the_idle_session_is_closed_with_421(channel, smtp_server):
    assert channel.send(email(delivery_id=1)).is_sent
    smtp_server.fail_next_mail(1, "421 4.4.2 Idle timeout, closing")

    result = channel.send(email(delivery_id=2))

    assert (result.outcome, result.error) == ("sent", None)
    assert [m.connection for m in smtp_server.wait_for(2)] == [1, 2]


def test_a_fresh_session_that_fails_is_not_retried_in_a_loop(channel, smtp_server):
    smtp_server.fail_next_mail(2, "421 4.3.2 System shutting down")
    result = channel.send(email())
    assert result.outcome == "transient"
    assert "421" in result.error
    assert smtp_server.connections == 1  # fresh session: no reconnect, the retry is later


def test_refused_recipient_550_is_permanent_and_the_session_carries_on(channel, smtp_server):
    smtp_server.reply_to_recipient("gone@example.com", "550 5.1.1 No such user")

    refused = channel.send(email(delivery_id=1, to="gone@example.com"))
    after = channel.send(email(delivery_id=2, to="ada@example.com"))

    assert refused.outcome == "permanent"
    assert "550" in refused.error and "No such user" in refused.error
    assert refused.provider_message_id is None
    assert after.is_sent
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ada@example.com"]
    assert smtp_server.connections == 1


def test_a_refused_sender_is_permanent_and_the_session_carries_on(channel, smtp_server):
    smtp_server.fail_next_mail(1, "550 5.7.1 Sender rejected")

    refused = channel.send(email(delivery_id=1))
    after = channel.send(email(delivery_id=2))

    assert refused.outcome == "permanent"
    assert "MAIL FROM" in refused.error and "550" in refused.error
    # Pipelined, RCPT and DATA were already on their way: their refusals were read, so
    # the next message's replies are its own.
    assert after.is_sent
    (received,) = smtp_server.wait_for(1)
    assert received.message["Message-ID"] == "<herald.d2@herald.test>"
    assert smtp_server.connections == 1


def test_greylisted_recipient_451_is_transient(channel, smtp_server):
    smtp_server.reply_to_recipient("grey@example.com", "451 4.7.1 Greylisted, retry later")
    result = channel.send(email(to="grey@example.com"))
    assert result.outcome == "transient"
    assert "451" in result.error
    assert smtp_server.accepted_count == 0


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 Mail queue full", "transient"), ("554 5.7.1 Message rejected", "permanent")],
)
def test_data_refusal_is_classified_by_its_code(channel, smtp_server, reply, outcome):
    smtp_server.fail_next(1, reply)
    result = channel.send(email(delivery_id=1))
    assert result.outcome == outcome
    assert reply.split()[0] in result.error
    assert channel.send(email(delivery_id=2)).is_sent  # one failure, then normal service
    assert [m.message["Message-ID"] for m in smtp_server.wait_for(1)] == ["<herald.d2@herald.test>"]


def test_a_stalled_server_is_a_transient_timeout_and_the_retry_keeps_the_id(channel, smtp_server):
    smtp_server.stall_next(STALL)
    started = time.monotonic()

    stalled = channel.send(email(delivery_id=9))

    assert time.monotonic() - started < STALL  # gave up at the read timeout
    assert stalled.outcome == "transient"
    assert "mid-message" in stalled.error
    retried = channel.send(email(delivery_id=9))
    assert retried.is_sent
    # The slow relay accepted the first copy after all: both carry the same Message-ID,
    # which is what lets the receiving side see the duplicate for what it is.
    copies = smtp_server.wait_for(2, timeout=STALL + 2)
    assert [m.message["Message-ID"] for m in copies] == ["<herald.d9@herald.test>"] * 2
    assert smtp_server.connections == 2


def test_unreachable_server_is_transient(smtp_server, channel_settings):
    settings = smtp_server.settings(channel_settings)
    smtp_server.stop()
    with channel_for("email", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(email())
    assert result.outcome == "transient"
    assert result.error.startswith("SMTP connection failed")


def test_header_injection_is_refused_without_sending(channel, smtp_server):
    result = channel.send(email(subject="Hi\r\nBcc: everyone@example.com"))
    assert result.outcome == "permanent"
    assert result.error.startswith("could not build the email")
    assert channel.send(email(delivery_id=2)).is_sent
    assert len(smtp_server.wait_for(1)) == 1


def test_an_address_with_a_line_break_smuggles_no_command(channel, smtp_server):
    result = channel.send(email(delivery_id=1, to="ada@example.com\r\nRCPT TO:<eve@x.test>"))
    assert result.outcome == "permanent"
    assert channel.send(email(delivery_id=2)).is_sent  # the session is still in step
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ada@example.com"]


def test_starttls_and_auth(secure_smtp_server, smtp_tls, channel_settings):
    settings = secure_smtp_server.settings(channel_settings)
    assert settings.smtp_starttls and settings.smtp_username == "herald"
    channel = SmtpChannel(settings, ssl_context=smtp_tls[1], **FAST_TIMEOUTS)
    with channel:
        results = channel.send_many([email(delivery_id=1), email(delivery_id=2)])
    assert [r.outcome for r in results] == ["sent", "sent"]
    received = secure_smtp_server.wait_for(2)
    assert [(m.tls, m.auth_user, m.connection) for m in received] == [(True, "herald", 1)] * 2


def test_wrong_password_is_permanent_credentials_rejected(
    secure_smtp_server, smtp_tls, channel_settings
):
    settings = secure_smtp_server.settings(channel_settings, smtp_password="wrong")
    with SmtpChannel(settings, ssl_context=smtp_tls[1], **FAST_TIMEOUTS) as channel:
        result = channel.send(email())
    assert result.outcome == "permanent"
    assert result.error == "SMTP credentials rejected (535)"
    assert secure_smtp_server.accepted_count == 0


def test_an_untrusted_certificate_is_refused(secure_smtp_server, channel_settings):
    # The system trust store does not know the test certificate: verification is on.
    with channel_for("email", secure_smtp_server.settings(channel_settings)) as channel:
        result = channel.send(email())
    assert result.outcome == "permanent"
    assert "certificate" in result.error
    assert secure_smtp_server.accepted_count == 0


def test_a_relay_requiring_tls_never_gets_the_message_in_clear(
    secure_smtp_server, channel_settings
):
    settings = secure_smtp_server.settings(channel_settings, smtp_starttls=False, smtp_username="")
    with channel_for("email", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(email())
    assert result.outcome == "permanent"
    assert "530" in result.error
    assert secure_smtp_server.accepted_count == 0


# -- the direct MIME path against EmailMessage -------------------------------------------


_CHANNEL = SmtpChannel(Settings(email_from="Herald Team <news@herald.example>"))


def _read_back(data: bytes) -> dict:
    """What a receiving client sees: decoded headers and bodies."""
    parsed = message_from_bytes(data, policy=email_policy.default)
    bodies = {}
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            bodies[part.get_content_subtype()] = (
                part.get_content().replace("\r\n", "\n").rstrip("\n")
            )
    headers = {
        name: str(parsed[name])
        for name in ("From", "To", "Subject", "Message-ID", "Reply-To", "List-Unsubscribe")
        if parsed[name] is not None
    }
    return {"headers": headers, "bodies": bodies, "multipart": parsed.is_multipart()}


def _both_paths(message: OutboundMessage) -> tuple[dict, dict | None]:
    _, built = _CHANNEL.build_email(message)
    slow = _read_back(built.as_bytes(policy=built.policy))
    _, data = _CHANNEL.plain_bytes(message)
    if data is None:
        return slow, None  # declined: email_bytes falls back to EmailMessage
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    return slow, _read_back(data)


@pytest.mark.parametrize(
    "content",
    [
        {"subject": "Spring sale", "text": "Hi Ada,\nsee you", "html": "<p>Hi Ada</p>"},
        {"subject": "Soldes d'été 🌸 jusqu'à -50 %", "text": "Bonjour Zoë,\nà bientôt"},
        {"subject": "x" * 300, "html": "<p>" + "long line " * 200 + "</p>"},
        {"subject": "Hi", "text": "naïve café\r\nline two\rline three", "from_name": "Zoë Café"},
        {"subject": "Hi", "text": "a", "from_name": 'Herald, "Inc."', "reply_to": "r@x.example"},
        {"subject": "Tab\there", "text": "falls back to EmailMessage"},
        {"subject": "Hi", "html": "<p>only html</p>", "headers": {"X-Campaign": "c1"}},
    ],
)
def test_the_direct_mime_path_reads_back_like_email_message(content):
    headers = {
        "List-Unsubscribe": "<https://herald.example/u/abc.def>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        **content.pop("headers", {}),
    }
    slow, fast = _both_paths(email(**content, headers=headers))
    if "\t" in content["subject"]:
        assert fast is None  # a control character: declined, EmailMessage writes it
    else:
        assert fast == slow


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    subject=st.text(max_size=200),
    text=st.text(min_size=1, max_size=400),
    html=st.one_of(st.none(), st.text(min_size=1, max_size=200)),
    name=st.one_of(st.none(), st.text(max_size=40)),
)
def test_the_direct_mime_path_agrees_with_email_message_on_any_text(subject, text, html, name):
    content = {"subject": subject, "text": text, "html": html, "from_name": name}
    try:
        slow, fast = _both_paths(email(**content))
    except (ValueError, TypeError):
        return  # EmailMessage refuses it too (e.g. a line break in a header): so do we
    if fast is not None:
        assert fast["bodies"] == slow["bodies"]
        assert fast["headers"] == slow["headers"]


@contextmanager
def scripted_pipelining_relay(
    channel_settings: Settings, seen: dict, before_replies: Callable[[], None] = lambda: None
) -> Iterator[Settings]:
    """A relay on a raw socket that offers PIPELINING and answers nothing until it has
    the whole envelope (and `before_replies` has returned); what it read goes to `seen`.
    Yields the settings that point an SMTP channel at it, for one message."""

    def relay(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        connection.settimeout(5)
        with connection, connection.makefile("rb") as lines:
            connection.sendall(b"220 relay.test ESMTP\r\n")
            lines.readline()  # EHLO
            connection.sendall(b"250-relay.test\r\n250 PIPELINING\r\n")
            seen["envelope"] = [lines.readline() for _ in range(3)]
            before_replies()
            connection.sendall(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 Go ahead\r\n")
            seen["data"] = list(iter(lines.readline, b".\r\n"))
            connection.sendall(b"250 2.0.0 queued\r\n")
            lines.readline()  # QUIT
            connection.sendall(b"221 2.0.0 Bye\r\n")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=relay, args=(listener,), daemon=True)
        server.start()
        yield replace(
            channel_settings,
            email_provider="smtp",
            smtp_host="127.0.0.1",
            smtp_port=listener.getsockname()[1],
            smtp_username="",
            smtp_password="",
            smtp_starttls=False,
        )
        server.join(5)


def test_a_pipelining_relay_gets_mail_rcpt_and_data_before_answering_any(channel_settings):
    """RFC 2920 on the wire: a relay that offers PIPELINING and answers nothing until it
    has the whole envelope. A client going command by command would wait for MAIL's
    reply that never comes, and time out."""
    seen: dict[str, list[bytes]] = {}
    with (
        scripted_pipelining_relay(channel_settings, seen) as settings,
        SmtpChannel(settings, **FAST_TIMEOUTS) as channel,
    ):
        result = channel.send(email(delivery_id=7, text="Hello\n.hidden dot line"))

    assert (result.outcome, result.error) == ("sent", None)
    assert seen["envelope"] == [
        b"MAIL FROM:<campaigns@herald.test>\r\n",
        b"RCPT TO:<ada@example.com>\r\n",
        b"DATA\r\n",
    ]
    assert b"..hidden dot line\r\n" in seen["data"]  # dot-stuffed (RFC 5321 4.5.2)
    assert b"Message-ID: <herald.d7@herald.test>\r\n" in seen["data"]


def test_the_dispatchers_round_trip_runs_while_the_relay_answers_the_envelope(
    channel_settings,
):
    """`cleared` (the journal write and rate token) runs after MAIL, RCPT and DATA are
    written and before the relay has answered them; the message follows only after it.
    Here the relay will not answer the envelope until `cleared` has run, and `cleared`
    looks whether the relay already has the envelope: both must be true."""
    envelope_read, cleared_ran = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def hold_the_replies() -> None:
        envelope_read.set()
        seen["cleared before the replies"] = cleared_ran.wait(2)

    def cleared() -> None:
        seen["envelope out when cleared"] = envelope_read.wait(2)
        cleared_ran.set()

    with (
        scripted_pipelining_relay(channel_settings, seen, hold_the_replies) as settings,
        SmtpChannel(settings, **FAST_TIMEOUTS) as channel,
    ):
        result = channel.begin(email(delivery_id=8), cleared)()

    assert (result.outcome, result.error) == ("sent", None)
    assert seen["envelope out when cleared"] is True
    assert seen["cleared before the replies"] is True
    assert b"Message-ID: <herald.d8@herald.test>\r\n" in seen["data"]


def test_a_failing_round_trip_is_raised_and_its_envelope_dropped(channel, smtp_server):
    """Redis down inside `cleared`: the dispatcher's exception goes up unchanged, the
    half-open envelope goes with the session, and nothing reaches the relay; the next
    message opens a new session."""

    def redis_down() -> None:
        raise ConnectionRefusedError("redis is restarting")

    with pytest.raises(ConnectionRefusedError, match="redis is restarting"):
        channel.begin(email(delivery_id=1), redis_down)
    assert channel.send(email(delivery_id=2)).is_sent
    (received,) = smtp_server.wait_for(1)
    assert received.message["Message-ID"] == "<herald.d2@herald.test>"
    assert len(smtp_server.messages) == 1
