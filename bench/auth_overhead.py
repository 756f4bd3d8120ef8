"""What authentication costs a request, measured against a baseline in the same run.

Every authenticated request checks, in one query, that its token's jti is not
blacklisted and its session is not revoked. This prints requests per second for
GET /healthz (no database), GET /api/v1/auth/me (JWT decode + that query + a user
lookup) and POST /api/v1/auth/login (Argon2id verification, deliberately slow), all
through the real WSGI app on PostgreSQL, plus the ratios.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python -m bench.auth_overhead
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from api import create_app
from engine.settings import get_settings


def rate(client, method: str, path: str, count: int, **kwargs) -> float:
    call = getattr(client, method)
    started = time.perf_counter()
    for _ in range(count):
        response = call(path, **kwargs)
        assert response.status_code < 400, response.get_data(as_text=True)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL"):
        raise SystemExit("set DATABASE_URL (a migrated PostgreSQL database) and REDIS_URL")

    app = create_app(get_settings())
    client = app.test_client()
    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    password = "bench-passphrase-not-common"
    assert client.post("/api/v1/auth/register", json={"email": email, "password": password})
    tokens = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    headers = {"Authorization": f"Bearer {tokens.get_json()['access_token']}"}

    n = args.requests
    healthz = rate(client, "get", "/healthz", n)
    me = rate(client, "get", "/api/v1/auth/me", n, headers=headers)
    logins = rate(
        client,
        "post",
        "/api/v1/auth/login",
        max(20, n // 100),
        json={"email": email, "password": password},
    )
    print(f"GET /healthz            {healthz:9.0f} req/s  (baseline)")
    print(f"GET /api/v1/auth/me     {me:9.0f} req/s  ({me / healthz:.2f}x baseline)")
    print(f"POST /api/v1/auth/login {logins:9.1f} req/s  ({logins / healthz:.4f}x baseline)")


if __name__ == "__main__":
    main()
