"""An SMTP relay on loopback (aiosmtpd) that records, counts connections, and misbehaves
on request: per-recipient replies, failures or stalls for the next N messages, STARTTLS
with a certificate made at test time, AUTH, and dropping every open connection (what a
relay does to an idle session)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, replace
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.settings import Settings


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    connection: int  # 1 for the first connection the server accepted, 2 for the next…
    tls: bool
    auth_user: str | None
    mail_options: list[str]


@dataclass
class _DataFault:
    reply: str | None  # None: stall, then accept
    delay: float
    times: int


def self_signed_tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate valid for
    127.0.0.1 and localhost, generated now. An EC key keeps this to a few milliseconds."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain reads files only
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, reporting each connection's life to the sink."""

    def __init__(self, sink: SmtpServer, handler: Any, **kwargs: Any) -> None:
        self._sink = sink
        self.connection_number = 0
        super().__init__(handler, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again on the same connection
        super().connection_made(transport)
        if first:
            self.connection_number = self._sink._opened(self)
        self.session.connection_number = self.connection_number

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._closed(self)
        super().connection_lost(error)

    def abort(self) -> None:
        (self._original_transport or self.transport).abort()


def _free_port() -> int:
    # aiosmtpd's Controller probes the port it was given, so it cannot bind port 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Controller(Controller):
    def __init__(self, sink: SmtpServer, **smtp_kwargs: Any) -> None:
        self._sink = sink
        super().__init__(sink, hostname="127.0.0.1", port=_free_port(), **smtp_kwargs)

    def factory(self) -> SMTP:
        return _TrackedSMTP(self._sink, self.handler, **self.SMTP_kwargs)


class SmtpServer:
    """A relay on 127.0.0.1. `tls` makes STARTTLS mandatory; `username` makes AUTH
    mandatory (over TLS when `tls` is set, as a real relay would insist); `pipelining`
    False makes it a relay without RFC 2920, which clients must talk to step by step."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
        latency: float = 0.0,
        record: bool = True,
        pipelining: bool = True,
    ) -> None:
        self.username = username
        self.password = password
        self.server_tls, self.client_tls = tls if tls else (None, None)
        self.latency = latency
        self.record = record
        # Real relays (Postfix, SES, …) offer RFC 2920 PIPELINING; aiosmtpd reads
        # pipelined commands in order but does not say so unless told (handle_EHLO).
        self.pipelining = pipelining
        self.messages: list[ReceivedMail] = []
        self.accepted_count = 0
        self.connections = 0
        self._open: set[_TrackedSMTP] = set()
        self._recipient_replies: dict[str, tuple[str, int | None]] = {}
        self._data_faults: list[_DataFault] = []
        self._mail_replies: list[str] = []
        self._lock = threading.Condition()
        kwargs: dict[str, Any] = {}
        if self.server_tls is not None:
            kwargs.update(tls_context=self.server_tls, require_starttls=True)
        if username is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=tls is not None)
        self._controller = _Controller(self, **kwargs)
        self.port = self._controller.port
        self._stopped = True

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SmtpServer:
        self._controller.start()
        self._stopped = False
        with self._lock:
            self.connections = 0  # Controller.start() probes the server once; not ours
        return self

    def stop(self) -> None:
        if not self._stopped:  # stopping twice is fine: a test may stop the server early
            self._stopped = True
            self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def settings(self, base: Settings, **overrides: Any) -> Settings:
        values = {
            "email_provider": "smtp",
            "smtp_host": "127.0.0.1",
            "smtp_port": self.port,
            "smtp_username": self.username or "",
            "smtp_password": self.password or "",
            "smtp_starttls": self.server_tls is not None,
            **overrides,
        }
        return replace(base, **values)

    def env(self) -> dict[str, str]:
        return {
            "EMAIL_PROVIDER": "smtp",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.port),
            "SMTP_USERNAME": self.username or "",
            "SMTP_PASSWORD": self.password or "",
            "SMTP_STARTTLS": "1" if self.server_tls is not None else "0",
        }

    # -- the fault script --------------------------------------------------------------

    def reply_to_recipient(self, address: str, reply: str, *, times: int | None = None) -> None:
        """Answer RCPT TO for `address` with `reply` (e.g. "550 5.1.1 No such user")."""
        with self._lock:
            self._recipient_replies[address.lower()] = (reply, times)

    def fail_next(self, count: int = 1, reply: str = "451 4.3.0 Try again later") -> None:
        """Refuse the next `count` messages at the end of DATA with `reply`."""
        with self._lock:
            self._data_faults.append(_DataFault(reply, 0.0, count))

    def fail_next_mail(self, count: int = 1, reply: str = "421 4.4.2 Idle timeout") -> None:
        """Answer the next `count` MAIL FROM commands with `reply`."""
        with self._lock:
            self._mail_replies.extend([reply] * count)

    def stall_next(self, seconds: float, count: int = 1) -> None:
        """Hold the end-of-DATA reply of the next `count` messages for `seconds`, then
        accept them: the relay has the message even if the client stopped waiting."""
        with self._lock:
            self._data_faults.append(_DataFault(None, seconds, count))

    def drop_connections(self, timeout: float = 5.0) -> int:
        """Close every open connection, as a relay does to idle sessions; returns how
        many it closed once they are all gone."""
        with self._lock:
            victims = list(self._open)
        for protocol in victims:
            self._controller.loop.call_soon_threadsafe(protocol.abort)
        with self._lock:
            self._lock.wait_for(lambda: not (self._open & set(victims)), timeout=timeout)
        return len(victims)

    # -- what was received ---------------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 15.0) -> list[ReceivedMail]:
        with self._lock:
            self._lock.wait_for(lambda: self.accepted_count >= count, timeout=timeout)
            found = list(self.messages)
        assert self.accepted_count >= count, f"expected {count} message(s), got {len(found)}"
        return found

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    # -- aiosmtpd hooks ------------------------------------------------------------------

    def _opened(self, protocol: _TrackedSMTP) -> int:
        with self._lock:
            self.connections += 1
            self._open.add(protocol)
            return self.connections

    def _closed(self, protocol: _TrackedSMTP) -> None:
        with self._lock:
            self._open.discard(protocol)
            self._lock.notify_all()

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        ):
            return AuthResult(success=True, auth_data=self.username)
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # the hook owns this once it exists
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.username is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        with self._lock:
            scripted = self._mail_replies.pop(0) if self._mail_replies else None
        if scripted is not None:
            if scripted.startswith("421"):
                # 421 means the relay hangs up after saying so: close once the reply
                # (written synchronously when this hook returns) is on its way.
                server.loop.call_soon(server.transport.close)
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._lock:
            scripted = self._recipient_replies.get(address.lower())
            if scripted is not None:
                reply, times = scripted
                if times is not None:
                    if times <= 1:
                        del self._recipient_replies[address.lower()]
                    else:
                        self._recipient_replies[address.lower()] = (reply, times - 1)
        if scripted is not None:
            return scripted[0]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self._take_data_fault()
        if fault is not None and fault.reply is not None:
            await asyncio.sleep(fault.delay)
            return fault.reply
        mail = ReceivedMail(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            message=message_from_bytes(envelope.content, policy=email_policy.default),
            raw=envelope.content,
            connection=getattr(session, "connection_number", 0),
            tls=session.ssl is not None,
            auth_user=session.auth_data if session.authenticated else None,
            mail_options=list(envelope.mail_options),
        )
        if fault is not None:
            # Shielded: aiosmtpd cancels the handler when the client hangs up, but a
            # slow relay that got the whole message still delivers it.
            await asyncio.shield(self._accept_after(fault.delay, mail))
        else:
            self._accept(mail)
        return "250 2.0.0 OK queued"

    async def _accept_after(self, delay: float, mail: ReceivedMail) -> None:
        await asyncio.sleep(delay)
        self._accept(mail)

    def _accept(self, mail: ReceivedMail) -> None:
        with self._lock:
            if self.record:
                self.messages.append(mail)
            self.accepted_count += 1
            self._lock.notify_all()

    def _take_data_fault(self) -> _DataFault | None:
        with self._lock:
            if not self._data_faults:
                return None
            fault = self._data_faults[0]
            if fault.times <= 1:
                self._data_faults.pop(0)
            else:
                self._data_faults[0] = replace(fault, times=fault.times - 1)
            return fault
