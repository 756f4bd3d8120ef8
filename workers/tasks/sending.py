"""The channel batch tasks: herald.{email,sms,push,whatsapp}.send_batch.

Thin on purpose: build the process's provider and rate limiter once, then hand the
batch to engine.dispatch.sending.send_batch, which owns its transactions (the claim is
committed before any provider call). A redelivered or duplicated task is harmless: the
claim only takes rows still queued, so the second copy finds nothing to send. Failed
deliveries are retried by the reconciliation from next_attempt_at in PostgreSQL, never
by a Celery countdown, so the broker's visibility timeout never matters.
"""

from __future__ import annotations

import logging
import uuid

import redis
from celery import shared_task
from celery.signals import worker_process_init, worker_process_shutdown

from engine.channels import Channel, channel_for
from engine.clock import system_clock
from engine.dispatch.journal import AcceptanceJournal
from engine.dispatch.sending import send_batch
from engine.ratelimit import RateLimiter
from engine.settings import get_settings
from workers.db import session_factory

log = logging.getLogger("herald.sending")

# One provider connection (SMTP session, HTTP pool) per worker process and channel
# type, reused by every batch the process runs; closed when the process stops.
_channels: dict[str, Channel] = {}
_limiter: RateLimiter | None = None
_redis: redis.Redis | None = None


def channel(channel_type: str) -> Channel:
    if channel_type not in _channels:
        _channels[channel_type] = channel_for(channel_type, get_settings())
    return _channels[channel_type]


def _redis_client() -> redis.Redis | None:
    global _redis
    if _redis is None and get_settings().redis_url:
        _redis = redis.Redis.from_url(get_settings().redis_url)
    return _redis


def rate_limiter() -> RateLimiter:
    global _limiter
    if _limiter is None:
        _limiter = RateLimiter(_redis_client(), system_clock)
    return _limiter


def acceptance_journal() -> AcceptanceJournal | None:
    """The Redis acceptance journal; None for the embedded default (no Redis)."""
    client = _redis_client()
    return AcceptanceJournal(client) if client is not None else None


@worker_process_init.connect
def _forget_inherited_connections(**_kwargs) -> None:
    # A connection opened before the fork would be shared with the parent.
    global _limiter, _redis
    _channels.clear()
    _limiter = None
    _redis = None


@worker_process_shutdown.connect
def _close_channels(**_kwargs) -> None:
    for opened in list(_channels.values()):
        try:
            opened.close()
        except Exception:  # shutting down: a provider that already hung up is fine
            log.debug("closing %s channel failed", opened.channel_type, exc_info=True)
    _channels.clear()


def run_batch(channel_type: str, channel_id: str, first_id: int, last_id: int) -> dict:
    settings = get_settings()
    report = send_batch(
        session_factory(),
        channel_id=uuid.UUID(channel_id),
        first_id=int(first_id),
        last_id=int(last_id),
        settings=settings,
        lease_seconds=settings.lease_seconds,
        clock=system_clock,
        rate_limiter=rate_limiter(),
        channel=channel(channel_type),
        journal=acceptance_journal(),
    )
    log.info("%s batch %s [%s-%s]: %s", channel_type, channel_id, first_id, last_id, report)
    return report.__dict__


@shared_task(name="herald.email.send_batch")
def send_email_batch(channel_id: str, first_id: int, last_id: int) -> dict:
    return run_batch("email", channel_id, first_id, last_id)


@shared_task(name="herald.sms.send_batch")
def send_sms_batch(channel_id: str, first_id: int, last_id: int) -> dict:
    return run_batch("sms", channel_id, first_id, last_id)


@shared_task(name="herald.push.send_batch")
def send_push_batch(channel_id: str, first_id: int, last_id: int) -> dict:
    return run_batch("push", channel_id, first_id, last_id)


@shared_task(name="herald.whatsapp.send_batch")
def send_whatsapp_batch(channel_id: str, first_id: int, last_id: int) -> dict:
    return run_batch("whatsapp", channel_id, first_id, last_id)
