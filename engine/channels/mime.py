"""Composing a campaign email's bytes directly, for the common case.

The email package's EmailMessage under policy.SMTP parses every header it is given
back into a structured object and re-folds it on output: about 3.5 ms of CPU per
message here, several times the whole rest of a send (the latency bench in
docs/PERFORMANCE.md). A campaign email is always the same shape (a handful of headers,
text and/or HTML, UTF-8), so this writes that shape itself in ~50 µs, with the stdlib's
C encoders (binascii's quoted-printable) and email.header for RFC 2047 words.

It only takes what it can write exactly: ASCII addresses, header values without line
breaks, every header line within RFC 5322's 998 octets. Anything else returns None and
the caller builds the message with EmailMessage, as before (tests/test_channel_smtp.py
runs both paths and compares what a parser reads back).
"""

from __future__ import annotations

import binascii
import uuid
from collections.abc import Mapping
from email.header import Header
from email.utils import formataddr

# RFC 5322 2.1.1: a line MUST NOT exceed 998 characters.
MAX_LINE = 998
_FIELD_NAME_CHARS = frozenset(chr(c) for c in range(33, 127)) - {":"}


def _header_value(value: str) -> str | None:
    """A header's value ready to write: as is when it is printable ASCII, RFC 2047
    encoded (and folded) when not; None when it cannot be written safely here."""
    if not value.isprintable():
        return None  # controls and line breaks (Unicode's too): EmailMessage decides
    if value.isascii():
        return value
    if value != value.strip():
        return None  # an encoded word would keep edge spaces EmailMessage drops
    return Header(value, "utf-8").encode(linesep="\r\n")


def _body(text: str, subtype: str) -> list[str]:
    """One body part: 7bit when it is ASCII with short lines (the usual generated
    text), quoted-printable otherwise (binascii's C encoder, 76-character lines)."""
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalized.isascii() and all(len(line) <= MAX_LINE for line in normalized.split("\n")):
        encoding, payload = "7bit", normalized
    else:
        encoding = "quoted-printable"
        payload = binascii.b2a_qp(normalized.encode("utf-8"), istext=True).decode("ascii")
    if not payload.endswith("\n"):
        payload += "\n"
    return [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        f"Content-Transfer-Encoding: {encoding}",
        "",
        payload.replace("\n", "\r\n").removesuffix("\r\n"),
    ]


def plain_email_bytes(
    *,
    sender: str,
    from_name: str | None,
    to: str,
    subject: str,
    date: str,
    message_id: str,
    reply_to: str | None,
    headers: Mapping[str, str],
    text: str | None,
    html: str | None,
) -> bytes | None:
    """The whole message (headers and body, CRLF line ends), or None when this fast
    path cannot write it exactly and EmailMessage should."""
    if not (sender.isascii() and to.isascii()) or (reply_to and not reply_to.isascii()):
        return None
    if from_name and (not from_name.isprintable() or from_name != from_name.strip()):
        return None  # formataddr would encode what EmailMessage normalises
    values: list[tuple[str, str | None]] = [
        ("From", _header_value(formataddr((from_name or "", sender)))),
        ("To", _header_value(to)),
        ("Subject", _header_value(subject)),
        ("Date", date),
        ("Message-ID", message_id),
    ]
    if reply_to:
        values.append(("Reply-To", _header_value(reply_to)))
    for name, value in headers.items():
        if not name or not set(name) <= _FIELD_NAME_CHARS:
            return None
        values.append((name, _header_value(str(value))))
    values.append(("MIME-Version", "1.0"))
    lines = []
    for name, value in values:
        if value is None:
            return None
        line = f"{name}: {value}"
        if any(len(part) > MAX_LINE for part in line.split("\r\n")):
            return None
        lines.append(line)
    if text and html:
        boundary = f"=_herald_{uuid.uuid4().hex}"
        lines += [
            f'Content-Type: multipart/alternative; boundary="{boundary}"',
            "",
            f"--{boundary}",
            *_body(text, "plain"),
            f"--{boundary}",
            *_body(html, "html"),
            f"--{boundary}--",
            "",
        ]
    elif html or text:
        lines += _body(html or text or "", "html" if html else "plain")
        lines.append("")
    else:
        return None
    return "\r\n".join(lines).encode("ascii")
