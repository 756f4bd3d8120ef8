"""HTTP/1.1 on one kept-alive connection, a request written now and its answer read later.

httpx (the other HTTP providers' client) makes a call in one piece: the dispatcher can
do nothing while the provider works. The SMS channel's call is all wait and no work
(one small form out, one small JSON back), so it uses this instead: `start` writes the
request and returns what reads the response, and the dispatcher renders the next
message in between, as it does for SMTP (Channel.begin). It is also several times
cheaper in CPU per call than httpx, which is what a worker spends between two sends.

A request is bytes made by `request_bytes` ahead of the call (Channel.prepare, while the
previous call is out), so the call itself is one write; http.client opens the
connection (TLS, proxy tunnel) and parses the response, but does not write requests.

Deliberately small: one connection (a channel serves one worker thread), no HTTP/2, no
redirects, no cookies. Like httpx's clients it honours HTTPS_PROXY / HTTP_PROXY /
ALL_PROXY and NO_PROXY from the environment: through an http:// proxy, by a CONNECT
tunnel (with Proxy-Authorization when the proxy URL carries a user and password).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import select
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

# What http.client refuses in a request target (control characters and space).
_NOT_IN_A_TARGET = re.compile("[\x00-\x20\x7f]")


class TransportError(Exception):
    """No usable answer: `kind` is "timed out", "connection failed" or "transport error"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: Message  # case-insensitive .get(), as http.client parsed them
    body: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The parsed body; ValueError when it is not JSON (as httpx.Response.json)."""
        return json.loads(self.body)


class _ReadTimeout:
    """Connect within the connect timeout, then wait at most the read timeout per read."""

    read_timeout: float

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)  # type: ignore[attr-defined]


class _Plain(_ReadTimeout, http.client.HTTPConnection):
    pass


class _Tls(_ReadTimeout, http.client.HTTPSConnection):
    pass


class SplitHttpClient:
    """Requests to one origin (scheme://host[:port]) on one kept-alive connection."""

    def __init__(
        self,
        origin: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an http(s) origin is needed, got {origin!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._proxy = _proxy_for(parts.scheme, self._host)
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._headers = dict(headers or {})
        self._connection: _Plain | _Tls | None = None

    def request_bytes(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> bytes:
        """The whole request as written on the wire (what http.client would write:
        Host, the client's headers, then these, and Content-Length)."""
        if _NOT_IN_A_TARGET.search(path):  # as http.client refuses it: no smuggled request
            raise ValueError(f"a space or control character in the request path {path!r}")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in {**self._headers, **headers}.items()]
        lines.append(f"Content-Length: {len(body)}")
        for line in lines[1:]:  # as http.client refuses them: no header smuggled in
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError(f"a line break in the header {line[:40]!r}")
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body

    def start(self, request: bytes, method: str = "POST") -> Callable[[], Answer]:
        """Write the request (request_bytes); the returned function reads its answer
        (call it once, before the next start). Either raises TransportError, and the
        connection is then dropped so the next request opens a fresh one."""
        try:
            connection = self._connected()
        except OSError as exc:
            raise self._failed("connection failed", exc) from exc
        try:
            connection.sock.sendall(request)
        except OSError as exc:
            raise self._failed(_kind(exc), exc) from exc

        def answer() -> Answer:
            try:
                response = connection.response_class(connection.sock, method=method)
                response.begin()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise self._failed(_kind(exc), exc) from exc
            if response.will_close:  # the server ends the connection: so do we
                self.close()
            return Answer(response.status, response.headers, body)

        return answer

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connected(self) -> _Plain | _Tls:
        connection = self._connection
        if connection is not None and _closed_by_peer(connection):
            # The server ended the idle connection (its keep-alive timeout): a request
            # written on it would be lost, so open a new one instead, as httpx does.
            self.close()
            connection = None
        if connection is None:
            host, port = self._proxy.address if self._proxy else (self._host, self._port)
            if self._tls:
                connection = _Tls(
                    host, port, timeout=self._connect_timeout, context=ssl.create_default_context()
                )
            else:
                connection = _Plain(host, port, timeout=self._connect_timeout)
            if self._proxy is not None:
                connection.set_tunnel(self._host, self._port, headers=self._proxy.headers)
            connection.read_timeout = self._read_timeout
            connection.connect()
            self._connection = connection
        return connection

    def _failed(self, kind: str, exc: BaseException) -> TransportError:
        self.close()
        return TransportError(kind, str(exc) or type(exc).__name__)


@dataclass(frozen=True)
class _Proxy:
    address: tuple[str, int]
    headers: dict[str, str]


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The proxy the environment names for this origin, as httpx would pick it."""
    proxies = getproxies()  # the *_proxy variables, either case
    url = proxies.get(scheme) or proxies.get("all")
    if not url or proxy_bypass(host):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// proxies are supported, got {url!r}")
    headers = {}
    if parts.username is not None:
        user_password = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(user_password.encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    return _Proxy((parts.hostname, parts.port or 80), headers)


def _closed_by_peer(connection: http.client.HTTPConnection) -> bool:
    """Between two exchanges nothing may arrive: a readable socket means end of stream
    (or garbage), either way unusable."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return "transport error"
