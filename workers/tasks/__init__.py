"""Task modules; importing this package registers every task with the app."""

from workers.tasks import maintenance, system_mail

__all__ = ["maintenance", "system_mail"]
