"""Ops chores as Flask CLI commands: `flask --app api users create|verify|list`,
`flask --app api tokens purge`."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from api.extensions import db
from api.runtime import clock
from engine.errors import DomainError
from engine.models import User
from engine.services import auth

users = AppGroup("users", help="Manage marketer accounts.")
tokens = AppGroup("tokens", help="Token housekeeping.")


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


def register(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(tokens)
