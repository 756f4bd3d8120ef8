"""Push through Firebase Cloud Messaging, HTTP v1 API.

Authentication is OAuth2 for a service account: we sign a short JWT assertion with its
private key, trade it at the account's own `token_uri` for an access token, and reuse
that token until shortly before it expires.

A contact may have several devices. The delivery is one message to the contact, but
FCM v1 takes one token per call, so each token gets its own call and the delivery
counts as sent when any device accepted it. Tokens FCM calls dead are handed back so
the caller can drop them from the contact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from engine.channels.base import Channel, OutboundMessage, SendResult
from engine.channels.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    is_transient_status,
    json_or_empty,
    make_client,
    retry_after,
    transport_error,
)
from engine.settings import Settings

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # the longest Google accepts
# Refresh this long before the token expires, so a send never races its expiry.
REFRESH_MARGIN = 300


@dataclass(frozen=True)
class ServiceAccount:
    project_id: str
    client_email: str
    private_key: str
    token_uri: str
    private_key_id: str = ""

    @classmethod
    def load(cls, path: str) -> ServiceAccount:
        if not path:
            raise ValueError("PUSH_PROVIDER=fcm needs FCM_CREDENTIALS_FILE")
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"FCM_CREDENTIALS_FILE {path!r} is unreadable: {exc}") from exc
        missing = [
            key
            for key in ("project_id", "client_email", "private_key", "token_uri")
            if not data.get(key)
        ]
        if missing:
            raise ValueError(f"FCM_CREDENTIALS_FILE lacks {', '.join(missing)}")
        return cls(
            project_id=data["project_id"],
            client_email=data["client_email"],
            private_key=data["private_key"],
            token_uri=data["token_uri"],
            private_key_id=data.get("private_key_id", ""),
        )


@dataclass(frozen=True)
class _TokenResult:
    """What one call for one device token came to."""

    kind: str  # "accepted" | "invalid" | "transient" | "permanent"
    name: str = ""
    error: str = ""
    retry_after: float | None = None
    # Nothing else will work either (credentials): stop calling for this delivery.
    stop: bool = False


class _NoAccessToken(Exception):
    def __init__(self, result: _TokenResult) -> None:
        super().__init__(result.error)
        self.result = result


class FcmChannel(Channel):
    name = "fcm"
    channel_type = "push"

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self.account = ServiceAccount.load(settings.fcm_credentials_file)
        self.url = f"{settings.fcm_api_base}/v1/projects/{self.account.project_id}/messages:send"
        self._client = make_client(connect_timeout=connect_timeout, read_timeout=read_timeout)
        self._access_token = ""
        self._refresh_at = 0.0

    # -- sending -------------------------------------------------------------------

    def send(self, message: OutboundMessage) -> SendResult:
        delivery_id = message.delivery_id
        tokens = list(dict.fromkeys(t for t in message.push_tokens if t))
        if not tokens:
            return SendResult.permanent(delivery_id, "the contact has no push tokens")
        accepted: list[str] = []
        invalid: list[str] = []
        failures: list[_TokenResult] = []
        for token in tokens:
            result = self._send_to_token(token, message)
            if result.kind == "accepted":
                accepted.append(result.name)
                continue
            failures.append(result)
            if result.kind == "invalid":
                invalid.append(token)
            # Nothing accepted yet and FCM says "not now": stop, and the retry will try
            # every token again without having sent to any of them twice.
            if result.stop or (result.kind == "transient" and not accepted):
                break
        if accepted:
            return SendResult.sent(delivery_id, accepted[0], invalid)
        transient = [f for f in failures if f.kind == "transient"]
        if transient:
            waits = [f.retry_after for f in transient if f.retry_after is not None]
            return SendResult.transient(
                delivery_id, transient[0].error, max(waits) if waits else None, invalid
            )
        detail = "; ".join(dict.fromkeys(f.error for f in failures))
        return SendResult.permanent(
            delivery_id, f"no push token accepted ({len(tokens)} tried): {detail}", invalid
        )

    def payload_for(self, token: str, message: OutboundMessage) -> dict[str, Any]:
        content = message.content
        notification = {"title": content.get("title", ""), "body": content.get("body", "")}
        if content.get("image_url"):
            notification["image"] = content["image_url"]
        # FCM refuses non-string data values; the app reads "url" to open on tap.
        data = {str(k): str(v) for k, v in (content.get("data") or {}).items()}
        if content.get("url"):
            data["url"] = content["url"]
        fcm_message: dict[str, Any] = {"token": token, "notification": notification}
        if data:
            fcm_message["data"] = data
        return {"message": fcm_message}

    def _send_to_token(self, token: str, message: OutboundMessage) -> _TokenResult:
        payload = self.payload_for(token, message)
        for attempt in (1, 2):
            try:
                access_token = self._current_access_token()
            except _NoAccessToken as failure:
                return failure.result
            try:
                response = self._client.post(
                    self.url, json=payload, headers={"Authorization": f"Bearer {access_token}"}
                )
            except httpx.HTTPError as exc:
                return _TokenResult("transient", error=transport_error("fcm", exc))
            if response.is_success:
                return _TokenResult("accepted", name=str(json_or_empty(response).get("name", "")))
            error = _FcmError.of(response)
            if response.status_code == 401 and not error.third_party and attempt == 1:
                self._access_token = ""  # revoked or expired early: fetch a new one once
                continue
            return error.classify(response)
        raise AssertionError("unreachable: the second attempt always returns")

    # -- OAuth2 ------------------------------------------------------------------------

    def _current_access_token(self) -> str:
        if self._access_token and time.monotonic() < self._refresh_at:
            return self._access_token
        now = int(time.time())
        claims = {
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        assertion = jwt.encode(claims, self.account.private_key, "RS256", headers=headers)
        started = time.monotonic()
        try:
            response = self._client.post(
                self.account.token_uri, data={"grant_type": GRANT_TYPE, "assertion": assertion}
            )
        except httpx.HTTPError as exc:
            error = transport_error("fcm OAuth token request", exc)
            raise _NoAccessToken(_TokenResult("transient", error=error)) from exc
        body = json_or_empty(response)
        if not response.is_success or not body.get("access_token"):
            status = response.status_code
            reason = body.get("error")  # OAuth's "invalid_grant" and friends
            error = f"fcm OAuth token refused: {status}"
            if isinstance(reason, str):
                error += f" {reason}"
            if is_transient_status(status):
                raise _NoAccessToken(_TokenResult("transient", error=error))
            raise _NoAccessToken(
                _TokenResult("permanent", error=f"fcm credentials rejected ({error})", stop=True)
            )
        lifetime = float(body.get("expires_in", 3600))
        self._access_token = str(body["access_token"])
        self._refresh_at = started + lifetime - min(REFRESH_MARGIN, lifetime / 2)
        return self._access_token

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class _FcmError:
    """The parts of a google.rpc error body that decide what a failure means."""

    status: str
    message: str
    error_code: str  # FcmError.errorCode: UNREGISTERED, QUOTA_EXCEEDED, ...
    token_field_invalid: bool

    @property
    def third_party(self) -> bool:
        # APNs / web push credentials rejected: a 401 our OAuth token cannot fix.
        return self.error_code == "THIRD_PARTY_AUTH_ERROR"

    @classmethod
    def of(cls, response: httpx.Response) -> _FcmError:
        error = json_or_empty(response).get("error")
        error = error if isinstance(error, dict) else {}
        error_code = ""
        token_field_invalid = False
        for detail in error.get("details") or []:
            if not isinstance(detail, dict):
                continue
            error_code = error_code or str(detail.get("errorCode") or "")
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    token_field_invalid = True
        return cls(
            status=str(error.get("status") or ""),
            message=str(error.get("message") or ""),
            error_code=error_code,
            token_field_invalid=token_field_invalid,
        )

    def classify(self, response: httpx.Response) -> _TokenResult:
        status = response.status_code
        label = self.error_code or self.status
        error = f"fcm {status}" + (f" {label}" if label else "")
        if self.message:
            error += f": {self.message}"
        if self.error_code == "UNREGISTERED" or (status == 400 and self.token_field_invalid):
            return _TokenResult("invalid", error=error)
        if self.error_code == "SENDER_ID_MISMATCH":
            # The token belongs to another Firebase project: this one device fails, and it
            # stays on the contact, since a misconfigured project would otherwise wipe all.
            return _TokenResult("permanent", error=error)
        if status in (401, 403) and not self.third_party:
            return _TokenResult("permanent", error=f"fcm credentials rejected ({error})", stop=True)
        if is_transient_status(status) or self.error_code in ("QUOTA_EXCEEDED", "UNAVAILABLE"):
            return _TokenResult("transient", error=error, retry_after=retry_after(response))
        return _TokenResult("permanent", error=error)
