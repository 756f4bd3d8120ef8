"""pytest fixtures for the loopback providers. Import the ones a module uses:

    from tests.providers.fixtures import channel_settings_fixture, twilio_sink_fixture  # noqa: F401

and ask for them by their fixture name (`channel_settings`, `twilio_sink`). The
functions carry a `_fixture` suffix so a test's parameter never shadows the import
(ruff F811). Every sink is per test (starting one costs milliseconds), so fault scripts and
recordings never leak between tests. None of them needs the database.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.settings import Settings
from tests.providers.http_sinks import FcmSink, TwilioSink, WhatsAppSink
from tests.providers.smtp_sink import SmtpServer, self_signed_tls

# Timeouts for channels under test: far below a stall, so a timeout test takes ~0.5 s.
FAST_TIMEOUTS = {"connect_timeout": 0.5, "read_timeout": 0.5}
STALL = 1.5  # seconds a stalled sink holds its answer: comfortably beyond FAST_TIMEOUTS


@pytest.fixture(name="channel_settings")
def channel_settings_fixture() -> Settings:
    """Settings from the test environment, with a known public URL and sender, and
    every channel on the null provider until a test says otherwise (other fixtures
    change the process environment, so nothing is inherited from it)."""
    return replace(
        Settings.from_env(),
        public_base_url="http://herald.test",
        email_from="Herald <campaigns@herald.test>",
        email_provider="null",
        sms_provider="null",
        push_provider="null",
        whatsapp_provider="null",
    )


@pytest.fixture(name="smtp_server")
def smtp_server_fixture():
    """A plain relay: no TLS, no AUTH."""
    with SmtpServer() as server:
        yield server


@pytest.fixture(scope="session", name="smtp_tls")
def smtp_tls_fixture() -> tuple:
    """(server, client) SSL contexts for a self-signed loopback certificate."""
    return self_signed_tls()


@pytest.fixture(name="secure_smtp_server")
def secure_smtp_server_fixture(smtp_tls):
    """A relay that insists on STARTTLS, then AUTH (PLAIN/LOGIN) over it."""
    with SmtpServer(username="herald", password="s3cret-relay", tls=smtp_tls) as server:
        yield server


@pytest.fixture(name="twilio_sink")
def twilio_sink_fixture():
    with TwilioSink() as sink:
        yield sink


@pytest.fixture(name="fcm_sink")
def fcm_sink_fixture():
    with FcmSink() as sink:
        yield sink


@pytest.fixture(name="fcm_credentials")
def fcm_credentials_fixture(fcm_sink, tmp_path):
    """A service-account file whose token_uri points at the sink."""
    return fcm_sink.write_credentials(tmp_path)


@pytest.fixture(name="whatsapp_sink")
def whatsapp_sink_fixture():
    with WhatsAppSink() as sink:
        yield sink
