"""The request's database session: opened on first use, committed when the view
succeeds, rolled back otherwise. Services never commit; the request does, here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, g
from sqlalchemy.orm import Session, sessionmaker

from engine.db import make_engine, make_session_factory
from engine.settings import Settings

log = logging.getLogger("herald.api")


class Database:
    factory: sessionmaker[Session]

    def init_app(self, app: Flask, settings: Settings) -> None:
        self.engine = make_engine(settings)
        self.factory = make_session_factory(self.engine)
        app.after_request(self._commit_on_success)
        app.teardown_appcontext(self._close)

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
