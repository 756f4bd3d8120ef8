"""One database engine per worker process, made after the fork.

A pooled connection inherited across fork() would be shared by two processes; creating
the engine lazily in the child (and dropping any inherited one) avoids that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery.signals import worker_process_init
from sqlalchemy.orm import Session, sessionmaker

from engine.db import make_engine, make_session_factory, session_scope
from engine.settings import get_settings

_factory: sessionmaker[Session] | None = None


def session_factory() -> sessionmaker[Session]:
    global _factory
    if _factory is None:
        _factory = make_session_factory(make_engine(get_settings()))
    return _factory


@worker_process_init.connect
def _forget_inherited_engine(**_kwargs) -> None:
    global _factory
    if _factory is not None:
        _factory.kw["bind"].dispose(close=False)
    _factory = None


@contextmanager
def task_session() -> Iterator[Session]:
    """The task owns its transaction: commit when it returns, roll back if it raises."""
    with session_scope(session_factory()) as session:
        yield session
