"""The request's database session: opened on first use, committed when the view
succeeds, rolled back otherwise. Services never commit; the request does, here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, current_app, g, has_app_context
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine.db import make_engine, make_session_factory
from engine.settings import Settings

log = logging.getLogger("herald.api")


class Database:
    """Each app gets its own engine (app.extensions); this object only finds it."""

    _latest: sessionmaker[Session] | None = None

    def init_app(self, app: Flask, settings: Settings) -> None:
        factory = make_session_factory(make_engine(settings))
        app.extensions["herald_db"] = factory
        self._latest = factory
        app.after_request(self._commit_on_success)
        app.teardown_appcontext(self._close)

    @property
    def factory(self) -> sessionmaker[Session]:
        """The current app's session factory; outside an app context (scripts, test
        threads), the most recently created app's."""
        if has_app_context():
            return current_app.extensions["herald_db"]
        if self._latest is None:
            raise RuntimeError("no Herald app has been created")
        return self._latest

    @property
    def engine(self) -> Engine:
        return self.factory.kw["bind"]

    @staticmethod
    def dispose(app: Flask) -> None:
        """Close the app's pooled connections (tests make many apps)."""
        app.extensions["herald_db"].kw["bind"].dispose()

    @property
    def session(self) -> Session:
        if "db_session" not in g:
            g.db_session = self.factory()
        return g.db_session

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run once the request's transaction is committed (e.g. enqueue an email),
        so a worker never acts on rows a rollback took back."""
        g.setdefault("after_commit", []).append(callback)

    def _commit_on_success(self, response: Response) -> Response:
        session: Session | None = g.get("db_session")
        if session is None:
            return response
        if response.status_code < 400:
            session.commit()
            for callback in g.pop("after_commit", []):
                try:
                    callback()
                except Exception:
                    # The data is committed; answering 500 now would tell the client
                    # it was not. Log it: a lost email can be asked for again.
                    log.exception("after-commit action failed")
        else:
            session.rollback()
        return response

    def _close(self, _exc: BaseException | None) -> None:
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            session.close()
