"""Domain errors. The API maps each class to one HTTP status; workers log them.

They carry a stable machine-readable `code` and, for validation, `fields`: a map from
the path of each bad input to its messages, so clients can point at the exact field.
"""

from __future__ import annotations


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, fields=None, **extra) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.fields: dict[str, list[str]] = fields or {}
        self.extra = extra


class ValidationFailed(DomainError):
    code = "validation_error"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, current_status: str, action: str) -> None:
        super().__init__(
            f"cannot {action} from status {current_status!r}", current_status=current_status
        )
        self.current_status = current_status


class AuthenticationFailed(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after
