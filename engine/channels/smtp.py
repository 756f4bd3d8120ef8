"""Email over SMTP: one session reused for many messages.

A campaign sends thousands of messages to the same relay, so the connection (TCP,
STARTTLS, AUTH) is set up once and each message costs only MAIL/RCPT/DATA; where the
relay offers PIPELINING (RFC 2920, as Postfix and the hosted relays do) those three go
in one write, two round trips fewer per message. `begin` stops after the message's last
byte, so the dispatcher prepares the next message while the relay decides on this one
(its reply to the end of DATA is where a relay spends its time). The relay
may drop an idle session at any time; a disconnect noticed at MAIL FROM on a reused
session means nothing of this message reached the server, so we reconnect once and
carry on. A disconnect later than that leaves the outcome unknown: transient, and the
retry carries the same Message-ID so the receiving side can tell it is a resend.

SMTP acceptance (250 after DATA) means "sent", never "delivered".
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import smtplib
import ssl
from collections.abc import Callable
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from engine.channels.base import Channel, OutboundMessage, SendResult, answered
from engine.channels.mime import plain_email_bytes
from engine.settings import Settings

# "5.1.1 <bob@x>: user unknown": the enhanced status code (RFC 3463) a reply starts with.
_ENHANCED_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")

_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_BREAK = re.compile(r"[\r\n]")
# The replies that let a message's envelope go on, per command.
_EXPECTED = {"MAIL FROM": (250,), "RCPT TO": (250, 251), "DATA": (354,)}

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0

# Headers the channel itself owns; a caller-supplied duplicate would make two of them.
_OWN_HEADERS = frozenset(
    {"from", "to", "subject", "date", "message-id", "reply-to", "mime-version", "content-type"}
)
# 7bit transfer encoding keeps the body valid on relays without 8BITMIME; only an
# internationalised address (SMTPUTF8) needs raw UTF-8.
_ASCII_POLICY = email_policy.SMTP.clone(cte_type="7bit")


class _Unusable(Exception):
    """The session could not be opened; carries the classified result."""

    def __init__(self, outcome: str, error: str) -> None:
        super().__init__(error)
        self.outcome = outcome
        self.error = error

    def result(self, delivery_id: int) -> SendResult:
        if self.outcome == "permanent":
            return SendResult.permanent(delivery_id, self.error)
        return SendResult.transient(delivery_id, self.error)


class _StaleSession(Exception):
    """The reused session was gone before this message's MAIL FROM was accepted."""


class _NotCleared(Exception):
    """The dispatcher's `cleared` raised (Redis down) mid-envelope; its cause is that."""


class SmtpChannel(Channel):
    name = "smtp"
    channel_type = "email"

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.username = settings.smtp_username
        self.password = settings.smtp_password
        self.starttls = settings.smtp_starttls
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.local_hostname = local_hostname
        default_name, default_address = parseaddr(settings.email_from)
        if "@" not in default_address:
            raise ValueError(f"EMAIL_FROM has no address: {settings.email_from!r}")
        self.default_from_name = default_name
        self.default_from_email = default_address
        self._smtp: smtplib.SMTP | None = None

    # -- sending -------------------------------------------------------------------

    def prepare(self, message: OutboundMessage) -> OutboundMessage:
        try:
            _, data = self.email_bytes(message)
        except (ValueError, TypeError, LookupError):
            return message  # send() builds it again and says why it cannot
        return dataclasses.replace(message, wire=data)

    def send(self, message: OutboundMessage) -> SendResult:
        return self.begin(message)()

    def begin(
        self, message: OutboundMessage, cleared: Callable[[], None] = lambda: None
    ) -> Callable[[], SendResult]:
        """Everything up to the message's last byte; the returned function reads the
        relay's verdict on it (the reply that takes the relay's own latency).

        With PIPELINING, `cleared` (the dispatcher's journal write) runs while the
        relay answers MAIL, RCPT and DATA; the message itself goes only after it has
        returned. (The dispatcher passes it only when it cannot wait for a rate token,
        so the relay is never held at its 354.)"""
        delivery_id = message.delivery_id
        if message.wire is not None:
            sender, data = self._envelope_sender(message), message.wire
        else:
            try:
                sender, data = self.email_bytes(message)
            except (ValueError, TypeError, LookupError) as exc:
                return answered(
                    SendResult.permanent(delivery_id, f"could not build the email: {exc}")
                )
        utf8 = not (sender.isascii() and message.address.isascii())
        waiting = [cleared]

        def clear_once() -> None:
            if waiting:
                try:
                    waiting.pop()()
                except BaseException as exc:  # not the relay's fault: handed on as it is
                    raise _NotCleared from exc

        for _ in range(2):  # a stale reused session earns exactly one reconnect
            reused = self._smtp is not None
            try:
                smtp = self._session()
            except _Unusable as unusable:
                return answered(unusable.result(delivery_id))
            try:
                refused = self._envelope(smtp, message, sender, utf8, clear_once)
                if refused is None:
                    clear_once()  # both envelopes called it already; this is the guarantee
            except _NotCleared as failed:
                self._discard()  # the envelope is open: dropping the session ends it
                raise failed.__cause__ from None
            except _StaleSession as stale:
                self._discard()
                if not reused:
                    return answered(
                        SendResult.transient(
                            delivery_id, f"SMTP connection lost before MAIL FROM: {stale}"
                        )
                    )
                continue
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                return answered(self._lost(delivery_id, exc))
            if refused is not None:
                return answered(refused)
            try:
                smtp.send(_data_payload(data))
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                return answered(self._lost(delivery_id, exc))
            return lambda: self._verdict(smtp, message, sender)
        return answered(SendResult.transient(delivery_id, "SMTP connection lost twice"))

    def _envelope(
        self,
        smtp: smtplib.SMTP,
        message: OutboundMessage,
        sender: str,
        utf8: bool,
        cleared: Callable[[], None],
    ) -> SendResult | None:
        """MAIL, RCPT and DATA up to the relay's 354; the refusal, or None to go on.
        Raises _StaleSession when the session was gone before MAIL FROM was accepted."""
        delivery_id = message.delivery_id
        if _LINE_BREAK.search(sender) or _LINE_BREAK.search(message.address):
            # The MIME builders refuse these already; this keeps the envelope safe on its
            # own: smtplib would raise on it, and pipelined it would smuggle in a command.
            return SendResult.permanent(delivery_id, "an address with a line break cannot be sent")
        options = ""
        if utf8:
            if not smtp.has_extn("smtputf8"):
                return SendResult.permanent(
                    delivery_id, "SMTP server does not support SMTPUTF8 (non-ASCII address)"
                )
            options = " SMTPUTF8 BODY=8BITMIME"
        if smtp.has_extn("pipelining"):
            replies = self._pipelined_envelope(smtp, message, sender, options, utf8, cleared)
        else:
            cleared()
            replies = self._stepwise_envelope(smtp, message, sender, options)
        for stage, (code, reply) in zip(_EXPECTED, replies, strict=False):
            if code not in _EXPECTED[stage]:
                if stage != "DATA" and len(replies) == 3 and replies[2][0] == 354:
                    # A relay that took DATA although MAIL or RCPT failed (RFC 2920
                    # allows for it): an empty message ends it, and nothing is sent.
                    smtp.send(b".\r\n")
                    smtp.getreply()
                return self._refused(smtp, delivery_id, stage, code, reply)
        return None

    def _pipelined_envelope(
        self,
        smtp: smtplib.SMTP,
        message: OutboundMessage,
        sender: str,
        options: str,
        utf8: bool,
        cleared: Callable[[], None],
    ) -> list[tuple[int, bytes]]:
        """RFC 2920: the three commands in one write, their replies read in order. Two
        round trips fewer per message than command by command; `cleared` runs while
        the relay works on them."""
        commands = f"MAIL FROM:<{sender}>{options}\r\nRCPT TO:<{message.address}>\r\nDATA\r\n"
        try:
            smtp.send(commands.encode("utf-8" if utf8 else "ascii"))
            cleared()
            mail = smtp.getreply()
        except smtplib.SMTPServerDisconnected as exc:
            raise _StaleSession(str(exc)) from exc
        if mail[0] == 421:  # the relay timed the idle session out and says so before closing
            raise _StaleSession(f"421 {mail[1].decode('utf-8', 'replace')}")
        return [mail, smtp.getreply(), smtp.getreply()]

    def _stepwise_envelope(
        self, smtp: smtplib.SMTP, message: OutboundMessage, sender: str, options: str
    ) -> list[tuple[int, bytes]]:
        """For a relay without PIPELINING: each command waits for its reply, and the
        first refusal ends the envelope."""
        try:
            mail = smtp.mail(sender, options.split())
        except smtplib.SMTPServerDisconnected as exc:
            raise _StaleSession(str(exc)) from exc
        if mail[0] == 421:
            raise _StaleSession(f"421 {mail[1].decode('utf-8', 'replace')}")
        if mail[0] != 250:
            return [mail]
        rcpt = smtp.rcpt(message.address)
        if rcpt[0] not in (250, 251):
            return [mail, rcpt]
        smtp.putcmd("data")
        return [mail, rcpt, smtp.getreply()]

    def _verdict(self, smtp: smtplib.SMTP, message: OutboundMessage, sender: str) -> SendResult:
        delivery_id = message.delivery_id
        try:
            code, reply = smtp.getreply()
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            return self._lost(delivery_id, exc)
        if code != 250:
            return self._refused(smtp, delivery_id, "end of DATA", code, reply)
        return SendResult.sent(delivery_id, _message_id(message, sender))

    def _lost(self, delivery_id: int, exc: Exception) -> SendResult:
        # The relay may have queued the message before the line dropped: unknown, so
        # transient; the resend carries the same Message-ID.
        self._discard()
        return SendResult.transient(delivery_id, f"SMTP connection lost mid-message: {exc}")

    def _refused(
        self, smtp: smtplib.SMTP, delivery_id: int, stage: str, code: int, reply: bytes | str
    ) -> SendResult:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        error = f"SMTP {stage} refused: {code} {text}"
        if code == 421:  # the server is closing the session
            self._discard()
        else:
            try:
                smtp.rset()  # clear the envelope so the session serves the next message
            except (smtplib.SMTPException, OSError):
                self._discard()
        if 500 <= code < 600:
            # RFC 3463's enhanced status, when the refusal of RCPT names the mailbox.
            enhanced = _ENHANCED_STATUS.match(text) if stage == "RCPT TO" else None
            return SendResult.permanent(
                delivery_id, error, provider_code=enhanced.group(1) if enhanced else None
            )
        return SendResult.transient(delivery_id, error)  # 4xx, or a garbled reply (-1)

    # -- the message -----------------------------------------------------------------

    def email_bytes(self, message: OutboundMessage) -> tuple[str, bytes]:
        """(envelope sender, the message as sent). The common shape is written directly
        (engine.channels.mime, ~40x cheaper); anything it declines goes through
        EmailMessage. Raises ValueError like build_email."""
        sender, data = self.plain_bytes(message)
        if data is not None:
            return sender, data
        sender, email = self.build_email(message)
        return sender, email.as_bytes(policy=email.policy)

    def plain_bytes(self, message: OutboundMessage) -> tuple[str, bytes | None]:
        """(envelope sender, the message written directly), or None for the bytes when
        the direct path declines it."""
        content = message.content
        sender = self._envelope_sender(message)
        from_name = content.get("from_name")
        if from_name is None and not content.get("from_email"):
            from_name = self.default_from_name
        headers = content.get("headers") or {}
        for name in headers:
            if name.lower() in _OWN_HEADERS:
                raise ValueError(f"header {name} is set by the email channel itself")
        if content.get("text") or content.get("html"):
            data = plain_email_bytes(
                sender=sender,
                from_name=from_name,
                to=message.address,
                subject=content.get("subject") or "",
                date=formatdate(usegmt=True),
                message_id=_message_id(message, sender),
                reply_to=content.get("reply_to"),
                headers=headers,
                text=content.get("text"),
                html=content.get("html"),
            )
            return sender, data
        return sender, None

    def build_email(self, message: OutboundMessage) -> tuple[str, EmailMessage]:
        """(envelope sender, message). Raises ValueError when the content cannot make a
        valid email (e.g. a header value with a line break)."""
        content = message.content
        sender = self._envelope_sender(message)
        from_name = content.get("from_name")
        if from_name is None and not content.get("from_email"):
            from_name = self.default_from_name
        text, html = content.get("text"), content.get("html")
        if not text and not html:
            raise ValueError("an email needs text or html")
        utf8 = not (sender.isascii() and message.address.isascii())
        email = EmailMessage(policy=email_policy.SMTPUTF8 if utf8 else _ASCII_POLICY)
        local_part, _, domain = sender.rpartition("@")
        email["From"] = Address(display_name=from_name or "", username=local_part, domain=domain)
        email["To"] = message.address
        email["Subject"] = content.get("subject") or ""
        email["Date"] = formatdate(usegmt=True)
        email["Message-ID"] = _message_id(message, sender)
        if content.get("reply_to"):
            email["Reply-To"] = content["reply_to"]
        for name, value in (content.get("headers") or {}).items():
            if name.lower() in _OWN_HEADERS:
                raise ValueError(f"header {name} is set by the email channel itself")
            email[name] = value
        if text and html:
            email.set_content(text)
            email.add_alternative(html, subtype="html")
        elif html:
            email.set_content(html, subtype="html")
        else:
            email.set_content(text)
        return sender, email

    def _envelope_sender(self, message: OutboundMessage) -> str:
        return message.content.get("from_email") or self.default_from_email

    # -- the session -----------------------------------------------------------------

    def _session(self) -> smtplib.SMTP:
        if self._smtp is None:
            self._smtp = self._connect()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        try:
            # Host given here, not to connect(): STARTTLS verifies the certificate
            # against the name the SMTP object was constructed with.
            smtp = smtplib.SMTP(
                self.host,
                self.port,
                timeout=self.connect_timeout,
                local_hostname=self.local_hostname,
            )
        except Exception as exc:
            raise _classify_session_failure(exc) from exc
        try:
            smtp.sock.settimeout(self.read_timeout)
            smtp.ehlo_or_helo_if_needed()
            if self.starttls:
                smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                smtp.ehlo()
            if self.username:
                smtp.login(self.username, self.password)
        except Exception as exc:
            smtp.close()
            raise _classify_session_failure(exc) from exc
        return smtp

    def _discard(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    def close(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self._smtp.quit()  # polite, but a relay that already hung up is fine too
            self._discard()


def _data_payload(data: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.5.2): a line starting with a dot gets
    a second one, and a lone dot ends it."""
    payload = _LEADING_DOT.sub(b"..", data)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


def _message_id(message: OutboundMessage, sender: str) -> str:
    """Derived from the idempotency key, so a resend of the same delivery has the same
    Message-ID and receivers (and our bounce handling) see one message."""
    domain = sender.rpartition("@")[2] or "localhost"
    return f"<herald.{message.idempotency_key}@{domain}>"


def _classify_session_failure(exc: Exception) -> _Unusable:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        if 400 <= exc.smtp_code < 500:
            return _Unusable("transient", f"SMTP AUTH temporarily refused: {exc.smtp_code}")
        return _Unusable("permanent", f"SMTP credentials rejected ({exc.smtp_code})")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return _Unusable("permanent", f"SMTP server lacks a configured feature: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Unusable("permanent", f"SMTP server's TLS certificate rejected: {exc}")
    if isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code >= 500:
        error = exc.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
        return _Unusable("permanent", f"SMTP server refused the session: {exc.smtp_code} {text}")
    if isinstance(exc, smtplib.SMTPException | OSError):
        return _Unusable("transient", f"SMTP connection failed: {exc or type(exc).__name__}")
    raise exc  # a programming error, not a provider answer
