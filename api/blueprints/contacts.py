"""/api/v1/contacts: contacts, bulk upsert and CSV imports."""

from __future__ import annotations

import uuid

from flask import request
from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.body_limits import body_limit
from api.extensions import db
from api.input_guard import judges_text_itself
from api.openapi import login_required
from api.runtime import celery_app
from api.schemas.common import PageArgs
from api.schemas.contacts import (
    IMPORT_REQUEST_BODY,
    BulkArgs,
    BulkOut,
    ContactArgs,
    ContactListArgs,
    ContactOut,
    ContactPage,
    ImportOut,
    ImportPage,
)
from api.uploads import MultipartFile
from engine.models import Contact, ContactImport
from engine.pagination import paginate
from engine.services import contacts

blp = Blueprint("contacts", __name__, url_prefix="/api/v1/contacts", description="Contacts")

IMPORT_CONTACTS_TASK = "herald.sync.import_contacts"
BULK_BODY_LIMIT = 20 * 1024 * 1024
# An import streams straight into PostgreSQL, so size costs time, not memory; the limit
# only stops a runaway client.
IMPORT_BODY_LIMIT = 4 * 1024 * 1024 * 1024


@blp.post("")
@login_required
@blp.arguments(ContactArgs)
@blp.response(201, ContactOut)
@blp.alt_response(409, description="external_id or email already used by another contact")
def create_contact(args: dict):
    """Create a contact. Consent not given is false."""
    return contacts.create_contact(db.session, current_user.id, args)


@blp.get("")
@login_required
@blp.arguments(ContactListArgs, location="query")
@blp.response(200, ContactPage)
def list_contacts(args: dict):
    """The user's contacts, newest first, filtered by email, external_id or attribute."""
    stmt = contacts.contacts_query(
        current_user.id,
        email=args.get("email"),
        external_id=args.get("external_id"),
        attributes=args.get("attribute", ()),
    )
    page = paginate(db.session, stmt, Contact, limit=args["limit"], cursor=args["cursor"])
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.get("/<uuid:contact_id>")
@login_required
@blp.response(200, ContactOut)
def get_contact(contact_id: uuid.UUID):
    return contacts.get_contact(db.session, current_user.id, contact_id)


@blp.patch("/<uuid:contact_id>")
@login_required
@blp.arguments(ContactArgs)
@blp.response(200, ContactOut)
@blp.alt_response(409, description="external_id or email already used by another contact")
def update_contact(args: dict, contact_id: uuid.UUID):
    """Change the given fields; attributes merge (a null value removes a key)."""
    return contacts.update_contact(db.session, current_user.id, contact_id, args)


@blp.delete("/<uuid:contact_id>")
@login_required
@blp.response(204)
def delete_contact(contact_id: uuid.UUID):
    """Erase the contact (GDPR). Its deliveries stay, unlinked and with the address
    redacted, so campaign counters still equal their rows."""
    contacts.delete_contact(db.session, current_user.id, contact_id)


@blp.post("/bulk")
@login_required
@body_limit(BULK_BODY_LIMIT)
@judges_text_itself
@blp.arguments(BulkArgs)
@blp.response(200, BulkOut)
def bulk_upsert(args: dict):
    """Create or update up to 10,000 contacts, matched on external_id, else email.

    Every row is validated first; a bad row is rejected whole and the others are
    written. The answer lists each row as created, updated or rejected, with reasons.
    """
    return contacts.bulk_upsert(db.session, current_user.id, args["contacts"])


@blp.post("/imports")
@login_required
@body_limit(IMPORT_BODY_LIMIT)
@blp.doc(requestBody=IMPORT_REQUEST_BODY)
@blp.response(202, ImportOut)
def start_import():
    """Upload a CSV of contacts (multipart/form-data, field `file`).

    The rows are staged as they arrive and upserted by a worker in batches, with the
    same rules as the bulk route; poll the returned import for progress.
    """
    upload = MultipartFile(request.stream, request.mimetype, request.mimetype_params, "file")
    job = contacts.start_import(db.session, current_user.id, upload.filename, upload.stream)
    upload.finish()
    celery, import_id = celery_app(), str(job.id)
    db.after_commit(lambda: celery.send_task(IMPORT_CONTACTS_TASK, args=[import_id]))
    return job


@blp.get("/imports")
@login_required
@blp.arguments(PageArgs, location="query")
@blp.response(200, ImportPage)
def list_imports(args: dict):
    """The user's imports, newest first."""
    page = paginate(
        db.session,
        contacts.imports_query(current_user.id),
        ContactImport,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.get("/imports/<uuid:import_id>")
@login_required
@blp.response(200, ImportOut)
def get_import(import_id: uuid.UUID):
    """An import's progress: rows done of total, created, updated, rejected, and the
    first rejected rows with their reasons."""
    return contacts.get_import(db.session, current_user.id, import_id)
