"""Task modules; importing this package registers every task with the app."""

from workers.tasks import dispatch, imports, maintenance, sending, system_mail, tracking

__all__ = ["dispatch", "imports", "maintenance", "sending", "system_mail", "tracking"]
