"""flask-smorest configured for Herald: our error envelope in the generated document,
bearer auth declared once, and `login_required` that both guards and documents."""

from __future__ import annotations

from flask_jwt_extended import jwt_required
from flask_smorest import Api, Blueprint

from api.errors import handle_http_exception
from api.schemas.common import ErrorEnvelope

BEARER = [{"bearerAuth": []}]

OPENAPI_CONFIG = {
    "API_TITLE": "Herald",
    "API_VERSION": "v1",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/api/v1",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "docs",
    "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/",
    "API_SPEC_OPTIONS": {
        "info": {
            "description": "Herald campaign engine API. Errors always answer "
            '{"error": {"code", "message", "fields"}}.'
        },
    },
}


class HeraldApi(Api):
    ERROR_SCHEMA = ErrorEnvelope

    def handle_http_exception(self, error):
        return handle_http_exception(error)

    def init_app(self, app, *args, **kwargs):
        super().init_app(app, *args, **kwargs)
        self.spec.components.security_scheme(
            "bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        )


def login_required(view=None, *, refresh: bool = False):
    """jwt_required that also marks the operation as needing a bearer token in OpenAPI."""

    def decorate(func):
        return Blueprint.doc(security=BEARER)(jwt_required(refresh=refresh)(func))

    return decorate(view) if view is not None else decorate
