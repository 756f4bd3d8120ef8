"""Herald's domain: settings, database sessions, models and services.

Nothing in here imports Flask or Celery, so the API and the workers can both be thin
adapters over the same code.
"""
