"""Schema-driven fuzzing: schemathesis generates requests from our own OpenAPI document,
valid ones and invalid ones (wrong types, missing fields, odd ids and query strings),
and no answer may be a 5xx or anything but JSON.

It runs through the real app on PostgreSQL as a signed-in marketer. Operations that
would end that marketer's session (logout, password change, session revocation,
refresh) are left out, or every later example would stop at 401.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 25
SESSION_ENDING = {
    ("POST", "/api/v1/auth/logout"),
    ("POST", "/api/v1/auth/password"),
    ("POST", "/api/v1/auth/refresh"),
    ("DELETE", "/api/v1/auth/sessions/{session_id}"),
}


def documented(case, status: int) -> tuple[str, ...]:
    """JSON, always, except where the operation documents another type for this status
    (the per-message log's CSV export)."""
    responses = case.operation.definition.raw.get("responses", {})
    content = responses.get(str(status), {}).get("content", {})
    return ("application/json", *(t for t in content if t != "application/json"))


def test_no_operation_answers_a_server_error(app, alice):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if (op.method.upper(), op.path) not in SESSION_ENDING]
    assert len(fuzzed) >= 40

    for operation in fuzzed:
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def never_a_server_error(case):
            response = case.call(headers=alice["headers"])
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, (where, case.body, response.text[:500])
            if response.status_code != 204:
                content_type = response.headers.get("content-type", [""])[0]
                assert content_type.startswith(documented(case, response.status_code)), (
                    where,
                    response.status_code,
                    content_type,
                )

        never_a_server_error()
