"""Account emails (verification, password reset) sent by a worker, not the request.

An SMTP hiccup retries with backoff; the countdowns stay far below the broker's
visibility timeout, so a retry is never redelivered twice.
"""

from __future__ import annotations

import smtplib

from celery import shared_task

from engine.mail import SystemEmail, send_system_email
from engine.settings import get_settings


@shared_task(
    name="herald.send_system_email",
    autoretry_for=(smtplib.SMTPException, OSError),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=6,
)
def send_system_email_task(to: str, subject: str, text: str) -> str:
    return send_system_email(get_settings(), SystemEmail(to=to, subject=subject, text=text))
