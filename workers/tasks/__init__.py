"""Task modules; importing this package registers every task with the app."""

from workers.tasks import imports, maintenance, system_mail

__all__ = ["imports", "maintenance", "system_mail"]
