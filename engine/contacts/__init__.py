"""Contacts: validation of one contact, the set-based upsert, and CSV imports.

The API's single-contact routes, its bulk route and the import worker all judge a
contact with `validation.validate_contact`, and the bulk route and the worker both
write with `upsert.upsert_contacts`, so a row means the same thing whichever way in.
"""
