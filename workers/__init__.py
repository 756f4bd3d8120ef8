"""Celery adapter over the engine: `celery -A workers worker|beat|flower`.

Workers never import the API package; they share only the engine with it.
"""

from engine.settings import get_settings
from workers.celery_app import make_celery

app = make_celery(get_settings())
celery = app

__all__ = ["app", "celery"]
