"""HTTP providers on loopback: Twilio Programmable Messaging, FCM HTTP v1 (with the
OAuth2 token endpoint a service account names), Meta's WhatsApp Cloud API.

A sink answers like the real API (paths, auth, success and error bodies), records every
request parsed (form fields, JSON, headers, credentials) and obeys a script of faults.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.settings import Settings


@dataclass
class Recorded:
    """One request as the sink received it, and the status it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    form: dict[str, str] = field(default_factory=dict)
    json: Any = None
    basic_auth: tuple[str, str] | None = None
    bearer: str | None = None
    kind: str = "send"  # which endpoint: "send", or "token" for FCM's OAuth endpoint
    peer_port: int = 0  # the client's port: equal ports mean one kept-alive connection
    status: int = 0
    response: Any = None  # the JSON body the sink answered
    received_at: float = 0.0

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Fault:
    """A scripted failure. `times=None` repeats it forever; `match` limits it to requests
    for one address or push token; `delay` stalls the answer (beyond the client's
    timeout, that is a timeout); `drop` closes the connection without answering."""

    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    close_after: bool = False
    match: str | None = None
    times: int | None = 1
    on: str = "send"


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    sink: HttpSink

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (timeout tests) is expected, not news

    def shutdown_request(self, request) -> None:
        super().shutdown_request(request)
        with self.sink._lock:
            self.sink.closed_connections += 1
            self.sink._lock.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's pooling is exercised
    # One segment per answer, sent at once: otherwise headers and body go out as two
    # writes and Nagle plus delayed ACK add ~40 ms to every request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        self.server.sink._serve(self)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpSink:
    """Base of the HTTP sinks: the server thread, recording, and the fault script."""

    def __init__(self, *, latency: float = 0.0, record: bool = True) -> None:
        self.latency = latency
        self.record = record
        self.requests: list[Recorded] = []
        self.accepted_count = 0
        self.closed_connections = 0  # by either side, once the server has let go
        self._faults: list[Fault] = []
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.sink = self
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> HttpSink:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # how long stop() waits for the loop to notice
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice (a test may stop a sink early)."""
        if self._thread is None:
            return
        self._stopping.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread = None

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the fault script --------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def fail(
        self,
        status: int = 500,
        *,
        code: Any = None,
        message: str | None = None,
        times: int | None = 1,
        match: str | None = None,
        retry_after: float | str | None = None,
        on: str = "send",
    ) -> None:
        """Answer `status` with this provider's error body (carrying `code`)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = self.error_body(status, code, message)
        self.inject(Fault(status, body, headers, match=match, times=times, on=on))

    def stall(self, seconds: float, *, times: int | None = 1, match: str | None = None) -> None:
        """Hold the answer for `seconds`, then answer normally (the request still
        takes effect, like a provider that was merely slow)."""
        self.inject(Fault(status=0, delay=seconds, match=match, times=times))

    def drop(self, *, times: int | None = 1, match: str | None = None) -> None:
        """Close the connection without answering."""
        self.inject(Fault(drop=True, match=match, times=times))

    def close_after_answer(self, *, times: int | None = 1) -> None:
        """Answer normally, then close the connection without having said so (no
        Connection: close), as a server does when its keep-alive timeout runs out."""
        self.inject(Fault(status=0, close_after=True, times=times))

    def wait_closed(self, n: int, timeout: float = 5.0) -> None:
        """Until the server has closed `n` connections in all."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.closed_connections >= n, timeout):
                raise AssertionError(f"{self.closed_connections} connection(s) closed, not {n}")

    def _take_fault(self, request: Recorded) -> Fault | None:
        key = self.fault_key(request)
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.on != request.kind or (fault.match is not None and fault.match != key):
                    continue
                if fault.times is not None:
                    if fault.times <= 1:
                        del self._faults[index]
                    else:
                        self._faults[index] = replace(fault, times=fault.times - 1)
                return fault
        return None

    # -- what was received ---------------------------------------------------------------

    def received(self, kind: str = "send") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.kind == kind]

    def accepted(self, kind: str = "send") -> list[Recorded]:
        return [r for r in self.received(kind) if 200 <= r.status < 300]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Recorded]:
        """Block until `count` sends were accepted (a condition, not a sleep)."""
        with self._lock:
            self._lock.wait_for(lambda: self.accepted_count >= count, timeout=timeout)
        found = self.accepted()
        assert self.accepted_count >= count, f"expected {count} accepted, got {len(found)}"
        return found

    # -- protocol hooks ------------------------------------------------------------------

    def kind_of(self, path: str) -> str:
        return "send"

    def fault_key(self, request: Recorded) -> str | None:
        """The address or token a request is for, which `match` compares with."""
        return None

    def error_body(self, status: int, code: Any, message: str | None) -> Any:
        raise NotImplementedError

    def handle(self, request: Recorded) -> Response:
        raise NotImplementedError

    # -- the server side -----------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        request = Recorded(
            method=handler.command,
            path=split.path,
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            kind=self.kind_of(split.path),
            peer_port=handler.client_address[1],
            received_at=time.monotonic(),
        )
        _parse_body(request)
        _parse_auth(request)
        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(request)
        if fault is not None and fault.delay:
            self._stopping.wait(fault.delay)
        if fault is not None and fault.drop:
            handler.close_connection = True
            handler.connection.close()
            self._note(request, 0)
            return
        if fault is not None and fault.status:
            response = Response(fault.status, fault.body, fault.headers)
        else:
            response = self.handle(request)
        request.response = response.body
        self._note(request, response.status)
        payload = json.dumps(response.body).encode() if response.body is not None else b""
        try:
            handler.send_response(response.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload)
            handler.wfile.flush()
            if fault is not None and fault.close_after:
                handler.close_connection = True
        except OSError:
            handler.close_connection = True  # the client gave up waiting

    def _note(self, request: Recorded, status: int) -> None:
        request.status = status
        with self._lock:
            if self.record:
                self.requests.append(request)
            if request.kind == "send" and 200 <= status < 300:
                self.accepted_count += 1
            self._lock.notify_all()


def _parse_body(request: Recorded) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        parsed = parse_qs(request.body.decode(), keep_blank_values=True)
        request.form = {k: v[-1] for k, v in parsed.items()}
    elif content_type.startswith("application/json") and request.body:
        try:
            request.json = json.loads(request.body)
        except ValueError:
            request.json = None


def _parse_auth(request: Recorded) -> None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials).decode().partition(":")
            request.basic_auth = (user, password)
        except ValueError:
            pass
    elif scheme.lower() == "bearer":
        request.bearer = credentials


# -- Twilio --------------------------------------------------------------------------------


class TwilioSink(HttpSink):
    """POST /2010-04-01/Accounts/{AccountSid}/Messages.json with basic auth."""

    def __init__(
        self,
        *,
        account_sid: str = "AC" + "1" * 32,
        auth_token: str = "twilio-test-auth-token",
        from_number: str = "+15005550006",
        latency: float = 0.0,
        record: bool = True,
    ) -> None:
        super().__init__(latency=latency, record=record)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.from_number = from_number
        self.messages_path = f"/2010-04-01/Accounts/{account_sid}/Messages.json"

    def settings(self, base: Settings, **overrides: Any) -> Settings:
        values = {
            "sms_provider": "twilio",
            "twilio_api_base": self.url,
            "twilio_account_sid": self.account_sid,
            "twilio_auth_token": self.auth_token,
            "twilio_from": self.from_number,
            **overrides,
        }
        return replace(base, **values)

    def env(self) -> dict[str, str]:
        return {
            "SMS_PROVIDER": "twilio",
            "TWILIO_API_BASE": self.url,
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "TWILIO_FROM": self.from_number,
        }

    def reject_number(self, to: str, code: int = 21211, *, times: int | None = None) -> None:
        """A permanent refusal for one recipient (21211 invalid 'To', 21610 STOPped)."""
        self.fail(400, code=code, match=to, times=times)

    def fault_key(self, request: Recorded) -> str | None:
        return request.form.get("To")

    def error_body(self, status: int, code: Any, message: str | None) -> Any:
        code = code or {401: 20003, 404: 20404, 429: 20429}.get(status, 20500)
        return {
            "code": code,
            "message": message or _TWILIO_MESSAGES.get(code, "Error"),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }

    def handle(self, request: Recorded) -> Response:
        if request.basic_auth != (self.account_sid, self.auth_token):
            return Response(401, self.error_body(401, 20003, None), {"WWW-Authenticate": "Basic"})
        if request.method != "POST" or request.path != self.messages_path:
            return Response(404, self.error_body(404, 20404, None))
        form = request.form
        if not form.get("To"):
            return Response(400, self.error_body(400, 21604, "A 'To' phone number is required."))
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return Response(400, self.error_body(400, 21603, "A 'From' phone number is required."))
        if not form.get("Body"):
            return Response(400, self.error_body(400, 21602, "Message body is required."))
        sid = "SM" + uuid.uuid4().hex
        return Response(
            201,
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": form["To"],
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": form["Body"],
                "status": "queued" if form.get("From") else "accepted",
                "uri": f"{self.messages_path[:-5]}/{sid}.json",
            },
        )


_TWILIO_MESSAGES = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    21211: "The 'To' number is not a valid phone number.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
}


# -- FCM -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _service_account_key() -> tuple[str, Any]:
    """(PEM private key, public key): RSA generation is slow, so once per process."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


class FcmSink(HttpSink):
    """FCM HTTP v1 plus the OAuth2 token endpoint its service account names.

    POST /token trades a signed RS256 assertion for an access token (the sink verifies
    signature, audience, issuer and scope); POST /v1/projects/{p}/messages:send requires
    a bearer token that this sink issued and has not revoked.
    """

    SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

    def __init__(
        self,
        *,
        project_id: str = "herald-test",
        client_email: str = "herald@herald-test.iam.gserviceaccount.com",
        token_lifetime: int = 3600,
        latency: float = 0.0,
        record: bool = True,
    ) -> None:
        super().__init__(latency=latency, record=record)
        self.project_id = project_id
        self.client_email = client_email
        self.token_lifetime = token_lifetime
        self.private_key, self._public_key = _service_account_key()
        self.issued_tokens: set[str] = set()
        self._names = itertools.count(1)
        self.send_path = f"/v1/projects/{project_id}/messages:send"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def write_credentials(self, directory: Path) -> Path:
        """A service-account JSON file like the one Google hands out."""
        path = Path(directory) / "fcm-service-account.json"
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": self.project_id,
                    "private_key_id": "test-key-1",
                    "private_key": self.private_key,
                    "client_email": self.client_email,
                    "client_id": "1234567890",
                    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def settings(self, base: Settings, credentials_file: Path, **overrides: Any) -> Settings:
        values = {
            "push_provider": "fcm",
            "fcm_api_base": self.url,
            "fcm_credentials_file": str(credentials_file),
            **overrides,
        }
        return replace(base, **values)

    def env(self, credentials_file: Path) -> dict[str, str]:
        return {
            "PUSH_PROVIDER": "fcm",
            "FCM_API_BASE": self.url,
            "FCM_CREDENTIALS_FILE": str(credentials_file),
        }

    def revoke_tokens(self) -> None:
        """Forget every access token issued so far: the next send answers 401."""
        with self._lock:
            self.issued_tokens.clear()

    def unregister(self, token: str) -> None:
        """404 UNREGISTERED for this device token from now on (the app was removed)."""
        self.fail(404, code="UNREGISTERED", match=token, times=None)

    def invalid_token(self, token: str) -> None:
        """400 INVALID_ARGUMENT naming message.token (a malformed token)."""
        body = self.error_body(400, "INVALID_ARGUMENT", _INVALID_TOKEN)
        body["error"]["details"].append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": _INVALID_TOKEN}],
            }
        )
        self.inject(Fault(400, body, match=token, times=None))

    def kind_of(self, path: str) -> str:
        return "token" if path == "/token" else "send"

    def fault_key(self, request: Recorded) -> str | None:
        message = (request.json or {}).get("message") if isinstance(request.json, dict) else None
        return message.get("token") if isinstance(message, dict) else None

    def error_body(self, status: int, code: Any, message: str | None) -> Any:
        if status == 401 and code is None:
            return _google_error(401, "UNAUTHENTICATED", message or _UNAUTHENTICATED, [])
        code = code or _FCM_ERROR_CODES.get(status, "INTERNAL")
        details = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
        return _google_error(
            status, _GOOGLE_STATUS.get(status, "UNKNOWN"), message or code, details
        )

    def handle(self, request: Recorded) -> Response:
        if request.kind == "token":
            return self._grant(request)
        with self._lock:
            authorized = request.bearer in self.issued_tokens
        if not authorized:
            return Response(401, self.error_body(401, None, None))
        if request.path != self.send_path:
            return Response(
                404, _google_error(404, "NOT_FOUND", "Requested entity was not found.", [])
            )
        message = (request.json or {}).get("message") if isinstance(request.json, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("token"), str):
            return Response(400, self.error_body(400, "INVALID_ARGUMENT", "message.token required"))
        data = message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return Response(
                400, self.error_body(400, "INVALID_ARGUMENT", "data values must be strings")
            )
        name = f"projects/{self.project_id}/messages/0:{next(self._names)}%{uuid.uuid4().hex[:8]}"
        return Response(200, {"name": name})

    def _grant(self, request: Recorded) -> Response:
        form = request.form
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return Response(400, {"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self._public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                options={"require": ["iat", "exp", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return Response(400, {"error": "invalid_grant", "error_description": str(exc)})
        if self.SCOPE not in str(claims.get("scope", "")).split():
            return Response(400, {"error": "invalid_scope"})
        if claims["exp"] - claims["iat"] > 3600:
            return Response(400, {"error": "invalid_grant", "error_description": "exp too far"})
        token = "ya29." + secrets.token_urlsafe(24)
        with self._lock:
            self.issued_tokens.add(token)
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        return Response(200, body)


_INVALID_TOKEN = "The registration token is not a valid FCM registration token"
_UNAUTHENTICATED = "Request had invalid authentication credentials."
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FCM_ERROR_CODES = {
    400: "INVALID_ARGUMENT",
    403: "SENDER_ID_MISMATCH",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _google_error(status: int, status_text: str, message: str, details: list) -> dict:
    return {
        "error": {"code": status, "message": message, "status": status_text, "details": details}
    }


# -- WhatsApp Cloud API --------------------------------------------------------------------


class WhatsAppSink(HttpSink):
    """POST /{version}/{phone_number_id}/messages with a bearer access token."""

    def __init__(
        self,
        *,
        version: str = "v21.0",
        phone_number_id: str = "106540352242922",
        access_token: str = "EAAG-whatsapp-test-token",
        latency: float = 0.0,
        record: bool = True,
    ) -> None:
        super().__init__(latency=latency, record=record)
        self.version = version
        self.phone_number_id = phone_number_id
        self.access_token = access_token
        self.messages_path = f"/{version}/{phone_number_id}/messages"

    @property
    def api_base(self) -> str:
        return f"{self.url}/{self.version}"

    def settings(self, base: Settings, **overrides: Any) -> Settings:
        values = {
            "whatsapp_provider": "cloud",
            "whatsapp_api_base": self.api_base,
            "whatsapp_phone_number_id": self.phone_number_id,
            "whatsapp_access_token": self.access_token,
            **overrides,
        }
        return replace(base, **values)

    def env(self) -> dict[str, str]:
        return {
            "WHATSAPP_PROVIDER": "cloud",
            "WHATSAPP_API_BASE": self.api_base,
            "WHATSAPP_PHONE_NUMBER_ID": self.phone_number_id,
            "WHATSAPP_ACCESS_TOKEN": self.access_token,
        }

    def undeliverable(self, to: str, code: int = 131026, *, times: int | None = None) -> None:
        """A permanent refusal for one recipient (131026 not on WhatsApp, 131047 outside
        the 24-hour window)."""
        self.fail(400, code=code, match=to, times=times)

    def fault_key(self, request: Recorded) -> str | None:
        return request.json.get("to") if isinstance(request.json, dict) else None

    def error_body(self, status: int, code: Any, message: str | None) -> Any:
        code = code or {401: 190, 429: 130429, 503: 131016}.get(
            status, 131000 if status >= 500 else 100
        )
        text = message or _WHATSAPP_MESSAGES.get(code, "Invalid parameter")
        return {
            "error": {
                "message": f"({code}) {text}",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": text},
                "fbtrace_id": "A" + secrets.token_hex(8),
            }
        }

    def handle(self, request: Recorded) -> Response:
        if request.bearer != self.access_token:
            return Response(401, self.error_body(401, 190, None))
        if request.method != "POST" or request.path != self.messages_path:
            return Response(400, self.error_body(400, 100, "Unsupported post request"))
        body = request.json if isinstance(request.json, dict) else {}
        problem = _whatsapp_problem(body)
        if problem:
            return Response(400, self.error_body(400, 100, problem))
        result: dict[str, Any] = {"id": "wamid." + secrets.token_urlsafe(24)}
        if body["type"] == "template":
            result["message_status"] = "accepted"
        return Response(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"].lstrip("+")}],
                "messages": [result],
            },
        )


def _whatsapp_problem(body: dict) -> str | None:
    if body.get("messaging_product") != "whatsapp":
        return "messaging_product must be whatsapp"
    if not body.get("to"):
        return "to is required"
    if body.get("type") == "template":
        template = body.get("template") or {}
        if not template.get("name") or not (template.get("language") or {}).get("code"):
            return "template.name and template.language.code are required"
        for component in template.get("components") or []:
            for parameter in component.get("parameters") or []:
                if parameter.get("type") != "text" or not isinstance(parameter.get("text"), str):
                    return "template parameters must be text"
        return None
    if body.get("type") == "text":
        return None if (body.get("text") or {}).get("body") else "text.body is required"
    return "type must be template or text"


_WHATSAPP_MESSAGES = {
    100: "Invalid parameter",
    190: "Invalid OAuth access token - Cannot parse access token",
    130429: "Rate limit hit",
    131000: "Something went wrong",
    131016: "Service temporarily unavailable",
    131026: "Message undeliverable",
    131047: "Re-engagement message",
    132001: "Template name does not exist in the translation",
}
