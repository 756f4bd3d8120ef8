"""Ops chores as Flask CLI commands: `flask --app api users create|verify|list`,
`flask --app api tokens purge`, `flask --app api secrets rotate`."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from api.extensions import db
from api.runtime import clock, settings
from engine.crypto import SecretBox
from engine.errors import DomainError
from engine.models import User
from engine.services import auth, sources
from engine.settings import ConfigError

users = AppGroup("users", help="Manage marketer accounts.")
tokens = AppGroup("tokens", help="Token housekeeping.")
secrets_cli = AppGroup("secrets", help="Secrets stored encrypted (data source tokens).")


def _commit_or_fail(action) -> object:
    session = db.session
    try:
        result = action(session)
        session.commit()
        return result
    except DomainError as exc:
        session.rollback()
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in exc.fields.items())
        raise click.ClickException(f"{exc.message}{' (' + detail + ')' if detail else ''}") from exc


@users.command("create")
@click.option("--email", required=True)
@click.option("--password", required=True, prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--first-name", default=None)
@click.option("--last-name", default=None)
@click.option("--company", "company_name", default=None)
@click.option("--verified", is_flag=True, help="Mark the account verified at once.")
def create_user(email, password, first_name, last_name, company_name, verified):
    """Create an account."""
    user = _commit_or_fail(
        lambda s: auth.register_user(
            s,
            email=email,
            password=password,
            first_name=first_name,
            last_name=last_name,
            company_name=company_name,
            verified=verified,
        )
    )
    click.echo(f"created {user.email} ({user.id}){' verified' if verified else ''}")


@users.command("verify")
@click.argument("email")
def verify_user(email):
    """Mark an account's email verified without the emailed token."""

    def action(session):
        user = auth.find_user_by_email(session, email)
        if user is None:
            raise click.ClickException(f"no account with email {email}")
        return auth.mark_verified(session, user)

    user = _commit_or_fail(action)
    click.echo(f"verified {user.email}")


@users.command("list")
def list_users():
    """Print every account: id, email, verified."""
    for user in db.session.scalars(select(User).order_by(User.created_at)):
        click.echo(f"{user.id}  {user.email}  {'verified' if user.is_verified else 'unverified'}")


@tokens.command("purge")
def purge_tokens():
    """Delete expired blacklist rows and sessions now (beat does it hourly)."""
    purged = _commit_or_fail(lambda s: auth.purge_expired_tokens(s, clock().now()))
    click.echo(f"purged {purged['blacklist']} blacklist rows, {purged['sessions']} sessions")


@secrets_cli.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000))
def rotate_secrets(batch_size):
    """Re-encrypt every stored secret under the first ENCRYPTION_KEY key.

    After it succeeds, the older keys can be removed from ENCRYPTION_KEY. Each batch is
    its own transaction, so an interrupted run is simply run again.
    """
    try:
        box = SecretBox(settings())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    session = db.session
    after_id = None
    rotated = current = seen = 0
    unreadable = []
    while True:
        batch = sources.rotate_secrets_batch(session, box, after_id=after_id, limit=batch_size)
        session.commit()
        seen += batch.sources_seen
        rotated += batch.secrets_rotated
        current += batch.secrets_current
        unreadable.extend(batch.unreadable_sources)
        if batch.sources_seen < batch_size:
            break
        after_id = batch.last_id
    click.echo(
        f"rotated {rotated} secret(s) across {seen} source(s); "
        f"{current} already under the current key"
    )
    if unreadable:
        raise click.ClickException(
            f"{len(unreadable)} source(s) hold secrets no configured key decrypts; keep the "
            "old key until they are re-entered: " + ", ".join(str(i) for i in unreadable)
        )


def register(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(tokens)
    app.cli.add_command(secrets_cli)
