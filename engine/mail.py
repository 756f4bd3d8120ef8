"""System email: the few messages Herald itself sends to marketers (verification,
password reset), through the operator's configured email provider.

Campaign sending has its own batched channel layer; this path is deliberately simple:
one message, one SMTP conversation, called from a worker task, never from a request.
"""

from __future__ import annotations

import logging
import smtplib
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import make_msgid

from engine.settings import Settings

log = logging.getLogger("herald.mail")


@dataclass(frozen=True)
class SystemEmail:
    to: str
    subject: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def send_system_email(settings: Settings, email: SystemEmail) -> str:
    """Send through the configured provider; returns the Message-ID used."""
    sender_domain = settings.email_from.rsplit("@", 1)[-1].strip("> ") or "localhost"
    message_id = make_msgid(domain=sender_domain)
    if settings.email_provider == "null":
        # The null provider delivers to the log: the embedded default's "inbox".
        log.info(
            "null email provider: message %s to %s\nSubject: %s\n\n%s",
            message_id,
            email.to,
            email.subject,
            email.text,
        )
        return message_id

    message = EmailMessage()
    message["From"] = settings.email_from
    message["To"] = email.to
    message["Subject"] = email.subject
    message["Message-ID"] = message_id
    message.set_content(email.text)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password)
        smtp.send_message(message)
    log.info("system email %s sent to %s over SMTP", message_id, email.to)
    return message_id
