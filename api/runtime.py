"""Per-app runtime objects (settings, clock, login throttle, task producer) and the
accessors views use, so nothing reads the environment or a global at request time."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app

from api.extensions import db
from engine.clock import Clock
from engine.mail import SystemEmail
from engine.settings import Settings
from engine.throttle import LoginThrottle

SEND_SYSTEM_EMAIL = "herald.send_system_email"


@dataclass
class Runtime:
    settings: Settings
    clock: Clock
    throttle: LoginThrottle
    celery: Celery


def init_runtime(app: Flask, runtime: Runtime) -> None:
    app.extensions["herald"] = runtime


def _runtime() -> Runtime:
    return current_app.extensions["herald"]


def settings() -> Settings:
    return _runtime().settings


def clock() -> Clock:
    return _runtime().clock


def throttle() -> LoginThrottle:
    return _runtime().throttle


def enqueue_system_email(email: SystemEmail) -> None:
    """Queue the email for a worker once this request's transaction has committed."""
    celery = _runtime().celery
    db.after_commit(lambda: celery.send_task(SEND_SYSTEM_EMAIL, kwargs=email.as_dict()))


def celery_app() -> Celery:
    return _runtime().celery
