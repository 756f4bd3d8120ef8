"""The Flask API, built by an application factory (`flask --app api run`,
`gunicorn 'api:create_app()'`)."""

from __future__ import annotations

import logging

from flask import Flask

from engine.clock import Clock, system_clock
from engine.settings import Settings, get_settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> Flask:
    from api import cli, jwt_setup
    from api.blueprints import (
        audiences,
        auth,
        campaigns,
        contacts,
        conversations,
        deliveries,
        health,
        sources,
        suppressions,
        tracking,
        unsubscribe,
        webhooks,
    )
    from api.body_limits import init_body_limits
    from api.errors import register_error_handlers
    from api.extensions import db, openapi
    from api.input_guard import init_input_guard
    from api.openapi import OPENAPI_CONFIG
    from api.runtime import Runtime, init_runtime
    from engine.throttle import LoginThrottle
    from workers.celery_app import make_celery

    settings = settings or get_settings()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        JSON_SORT_KEYS=False,
        PROPAGATE_EXCEPTIONS=False,
        **OPENAPI_CONFIG,
    )
    logging.basicConfig(level=logging.INFO)

    init_runtime(
        app,
        Runtime(
            settings=settings,
            clock=clock or system_clock,
            throttle=LoginThrottle(settings),
            celery=make_celery(settings),
        ),
    )
    db.init_app(app, settings)
    jwt_setup.configure_jwt(app, settings)
    init_body_limits(app)
    init_input_guard(app)
    openapi.init_app(app)
    for resource in (
        auth,
        contacts,
        campaigns,
        deliveries,
        audiences,
        sources,
        conversations,
        unsubscribe,
        suppressions,
        webhooks,
        tracking,
    ):
        openapi.register_blueprint(resource.blp)
    app.register_blueprint(health.blp)
    register_error_handlers(app)
    cli.register(app)
    return app
