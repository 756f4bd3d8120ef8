"""Loopback provider sinks for the latency-bound dispatch benchmark.

Two servers that speak the protocols Herald's channels speak, each answering every
message after a fixed latency and counting what it accepted per idempotency key:

* SMTP (RFC 5321 server side: greeting, EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing,
  RSET, NOOP, QUIT; it offers RFC 2920 PIPELINING, as Postfix and the hosted relays
  do, and answers pipelined commands in order): the key is the Message-ID's left part
  after "herald." (the SMTP channel writes <herald.d<delivery id>@domain>), so a resend
  of one delivery counts as a duplicate of the same key; the latency is added before
  the reply to end-of-DATA.
* Twilio's REST API over HTTP/1.1 with keep-alive: POST
  /2010-04-01/Accounts/{sid}/Messages.json, form-encoded, HTTP basic auth, answered 201
  with the Message resource Twilio returns (400 with Twilio's error body for a missing
  To, From or Body, 401 for bad credentials); the key is the I-Twilio-Idempotency-Token
  header; the latency is added before a 201.

Why not aiosmtpd (which the provider tests use): it costs ~1.3 ms of CPU per message
on this machine (it parses every address with the email package's header parser), so
one sink process saturates below 800 msg/s and the benchmark would measure the sink.
These servers are bare asyncio protocols, a few hundred µs per message, mostly the
socket system calls.

Each sink runs in its own process (`SinkProcess`), so its CPU and GIL are not the
measured client's. Being asyncio servers, a connection waiting out its latency costs
nothing while the others are served. The latency is a timer on the event loop, which
wakes on millisecond boundaries (2 ms asked is ~2.2 ms served), so the sink reports the
mean it really waited.

A sink process is `python -m bench.sinks smtp|twilio <latency seconds>`; the parent
(`SinkProcess`) reads its port from its first line of output, then sends it commands,
one per line on its stdin: `stats` (counts, distinct keys, connections, first and last
acceptance on CLOCK_MONOTONIC, which is system-wide, so comparable with the parent's
time.monotonic()), `keys`, `reset`, `stop`. It exits at EOF too, so it never outlives
the bench.

This module imports nothing from Herald: a sink process starts fast and holds no
database or broker connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parent.parent
TWILIO_SID = "AC" + "b" * 32
TWILIO_TOKEN = "bench-twilio-auth-token"
TWILIO_FROM = "+15005550006"
HOSTNAME = b"sink.bench.local"
MAX_MESSAGE = 32 * 1024 * 1024
MAX_LINE = 64 * 1024  # a command or header block longer than this is refused
LONG_GAP = 0.001  # a client gap longer than this is a stall (a checkpoint, a new batch)

# Only the headers are searched: the body of a message may quote anything.
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<herald\.([^@>\s]+)@", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SinkStats:
    accepted: int  # messages answered with success
    keys: int  # distinct idempotency keys among them
    duplicates: int  # accepted keyed messages beyond one per key: resends
    unkeyed: int  # accepted messages without a recognisable key
    refused: int  # requests answered with an error (bad auth, missing field, bad command)
    connections: int  # connections opened since the last reset
    open_connections: int
    first: float | None  # time.monotonic() of the first and last acceptance
    last: float | None
    latency_mean: float  # seconds actually waited per message (asked: the latency)
    latency_max: float
    cpu_seconds: float  # user + system CPU of the sink process since it started
    # The client's turn: from a reply written to the next message's first byte on that
    # connection (the client's work between two calls, plus loopback and wake-ups).
    gap_mean: float = 0.0
    gap_p50: float = 0.0
    gap_p99: float = 0.0
    gap_long: float = 0.0  # the part of all gaps spent in gaps over LONG_GAP, seconds

    @property
    def window(self) -> float:
        """Seconds from the first acceptance to the last."""
        return self.last - self.first if self.first is not None and self.last else 0.0


class _Ledger:
    """What a sink accepted. Touched only from its event loop's thread."""

    def __init__(self) -> None:
        self.open = 0
        self.reset()

    def reset(self) -> None:
        self.reset_at = time.perf_counter()  # gaps that began before are not counted
        self.counts: Counter[str] = Counter()
        self.unkeyed = 0
        self.refused = 0
        self.connections = 0
        self.first: float | None = None
        self.last: float | None = None
        self.waited = 0.0
        self.waited_max = 0.0
        self.gaps: list[float] = []

    def gap(self, replied_at: float) -> None:
        if replied_at >= self.reset_at:
            self.gaps.append(time.perf_counter() - replied_at)

    def accept(self, key: str | None, waited: float) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.waited += waited
        self.waited_max = max(self.waited_max, waited)
        if key is None:
            self.unkeyed += 1
        else:
            self.counts[key] += 1

    def stats(self) -> SinkStats:
        keyed = sum(self.counts.values())
        accepted = keyed + self.unkeyed
        times = os.times()
        gaps = sorted(self.gaps)
        return SinkStats(
            accepted=accepted,
            keys=len(self.counts),
            duplicates=keyed - len(self.counts),
            unkeyed=self.unkeyed,
            refused=self.refused,
            connections=self.connections,
            open_connections=self.open,
            first=self.first,
            last=self.last,
            latency_mean=self.waited / accepted if accepted else 0.0,
            latency_max=self.waited_max,
            cpu_seconds=times.user + times.system,
            gap_mean=sum(gaps) / len(gaps) if gaps else 0.0,
            gap_p50=gaps[len(gaps) // 2] if gaps else 0.0,
            gap_p99=gaps[len(gaps) * 99 // 100] if gaps else 0.0,
            gap_long=sum(g for g in gaps if g > LONG_GAP),
        )


class _Connection(asyncio.Protocol):
    """Buffering, the latency timer and connection counting, shared by both sinks.

    While a reply waits out its latency, reading is paused and nothing else on this
    connection is processed, like a server busy with the message."""

    def __init__(self, ledger: _Ledger, latency: float) -> None:
        self.ledger = ledger
        self.latency = latency
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting = False
        self.closing = False
        self.close_after_reply = False  # "Connection: close" on a delayed answer
        self.replied_at: float | None = None  # the last reply, until the client's next byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # each reply is one write: never hold it back for an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ledger.connections += 1
        self.ledger.open += 1
        self.greet()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ledger.open -= 1
        self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.replied_at is not None:
            self.ledger.gap(self.replied_at)
            self.replied_at = None
        self.buffer += data
        if len(self.buffer) > MAX_MESSAGE + MAX_LINE:
            self.close()
            return
        if not self.waiting:
            self.process()

    def later(self, reply: bytes, key: str | None) -> None:
        """Accept the message and send `reply` after the latency."""
        if self.latency <= 0:
            self.ledger.accept(key, 0.0)
            self.write(reply)
            return
        self.waiting = True
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        loop.call_later(self.latency, self._answered, reply, key, started)

    def _answered(self, reply: bytes, key: str | None, started: float) -> None:
        self.waiting = False
        if self.closing:
            return  # the client hung up before the answer: not accepted
        self.ledger.accept(key, time.perf_counter() - started)
        self.write(reply)
        self.replied_at = time.perf_counter()
        if self.close_after_reply:
            self.close()
        else:
            self.process()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def greet(self) -> None:
        pass

    def process(self) -> None:
        raise NotImplementedError


# -- SMTP ----------------------------------------------------------------------------------

_EHLO = (
    b"250-" + HOSTNAME + b"\r\n"
    b"250-8BITMIME\r\n"
    b"250-PIPELINING\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SIZE " + str(MAX_MESSAGE).encode() + b"\r\n"
)


class _Smtp(_Connection):
    """One SMTP session: command mode, then data mode between DATA and the lone dot."""

    def greet(self) -> None:
        self.write(b"220 " + HOSTNAME + b" ESMTP bench sink\r\n")
        self.in_data = False
        self.mail_from: bytes | None = None
        self.recipients = 0

    def process(self) -> None:
        while not self.waiting and not self.closing:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if self.buffer.startswith(b".\r\n"):  # an empty message
                        end = -2
                    else:
                        return
                content = bytes(self.buffer[: max(end, 0)])
                del self.buffer[: end + 5]
                self.in_data = False
                self.mail_from, self.recipients = None, 0
                # Dot-unstuffing (RFC 5321 §4.5.2) is not needed to find the header.
                head = content.split(b"\r\n\r\n", 1)[0]
                found = _MESSAGE_ID.search(head)
                key = found.group(1).decode("ascii", "replace") if found else None
                self.later(b"250 2.0.0 OK queued\r\n", key)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.write(b"500 5.5.2 Line too long\r\n")
                    self.close()
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self.command(line)

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.mail_from, self.recipients = None, 0
            self.write(_EHLO)
        elif verb == b"HELO":
            self.mail_from, self.recipients = None, 0
            self.write(b"250 " + HOSTNAME + b"\r\n")
        elif verb == b"MAIL":
            if self.mail_from is not None:
                self.refuse(b"503 5.5.1 Error: nested MAIL command\r\n")
            elif not line[4:].upper().startswith(b" FROM:"):
                self.refuse(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            else:
                self.mail_from = line[10:]
                self.write(b"250 2.1.0 OK\r\n")
        elif verb == b"RCPT":
            if self.mail_from is None:
                self.refuse(b"503 5.5.1 Error: need MAIL command\r\n")
            elif not line[4:].upper().startswith(b" TO:"):
                self.refuse(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            else:
                self.recipients += 1
                self.write(b"250 2.1.5 OK\r\n")
        elif verb == b"DATA":
            if not self.recipients:
                self.refuse(b"503 5.5.1 Error: need RCPT command\r\n")
            else:
                self.in_data = True
                self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.mail_from, self.recipients = None, 0
            self.write(b"250 2.0.0 OK\r\n")
        elif verb == b"NOOP":
            self.write(b"250 2.0.0 OK\r\n")
        elif verb == b"QUIT":
            self.write(b"221 2.0.0 Bye\r\n")
            self.close()
        else:
            self.refuse(b"502 5.5.2 Error: command not recognized\r\n")

    def refuse(self, reply: bytes) -> None:
        self.ledger.refused += 1
        self.write(reply)


# -- Twilio over HTTP/1.1 --------------------------------------------------------------------

_MESSAGES_PATH = f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json".encode()
_CREDENTIALS = base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode())
_REASONS = {201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}


def _http_response(status: int, body: Any, keep_alive: bool) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + payload


def _twilio_error(status: int, code: int, message: str) -> tuple[int, dict]:
    return status, {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def twilio_answer(method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes):
    """(status, JSON body) as Twilio answers a Messages.json request."""
    scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"basic" or credentials.strip() != _CREDENTIALS:
        return _twilio_error(401, 20003, "Authenticate")
    if method != b"POST" or target != _MESSAGES_PATH:
        return _twilio_error(404, 20404, "The requested resource was not found")
    form = {k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    if not form.get("To"):
        return _twilio_error(400, 21604, "A 'To' phone number is required.")
    if not (form.get("From") or form.get("MessagingServiceSid")):
        return _twilio_error(400, 21603, "A 'From' phone number is required.")
    if not form.get("Body"):
        return _twilio_error(400, 21602, "Message body is required.")
    sid = "SM" + uuid.uuid4().hex
    return 201, {
        "sid": sid,
        "account_sid": TWILIO_SID,
        "to": form["To"],
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "body": form["Body"],
        "status": "queued" if form.get("From") else "accepted",
        "num_segments": "1",
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "uri": f"/2010-04-01/Accounts/{TWILIO_SID}/Messages/{sid}.json",
    }


class _Twilio(_Connection):
    """HTTP/1.1 with Content-Length bodies and keep-alive, one request at a time per
    connection (as httpx sends them; a pipelined request waits in the buffer)."""

    def process(self) -> None:
        while not self.waiting and not self.closing:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.close()
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                self.write(_http_response(411, {"message": "Length Required"}, False))
                self.close()
                return
            length = int(headers.get(b"content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return  # the body is still on its way
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, _, rest = lines[0].partition(b" ")
            target = rest.rpartition(b" ")[0]
            keep_alive = headers.get(b"connection", b"").lower() != b"close"
            status, answer = twilio_answer(method, target, headers, body)
            reply = _http_response(status, answer, keep_alive)
            if status == 201:
                key = headers.get(b"i-twilio-idempotency-token")
                self.later(reply, key.decode("ascii", "replace") if key else None)
            else:
                self.ledger.refused += 1
                self.write(reply)
            if not keep_alive:
                if self.waiting:
                    self.close_after_reply = True
                else:
                    self.close()
                return


# -- the sink process ------------------------------------------------------------------------

_PROTOCOLS = {"smtp": _Smtp, "twilio": _Twilio}


def serve(kind: str, latency: float) -> None:
    """A sink process's main: serve on a free loopback port, print it, then answer one
    JSON line on stdout per command line read from stdin; stop at "stop" or at EOF (the
    parent died)."""
    protocol = _PROTOCOLS[kind]
    # select(2), not epoll: epoll_wait's timeout is whole milliseconds, rounded up, so a
    # 2 ms latency landed anywhere between 2 and 3 ms depending on what else woke the
    # loop; select's is in microseconds. A sink has a handful of sockets.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    asyncio.set_event_loop(loop)
    ledger = _Ledger()
    server = loop.run_until_complete(
        loop.create_server(lambda: protocol(ledger, latency), "127.0.0.1", 0, backlog=1024)
    )

    async def command(name: str) -> Any:
        if name == "stats":
            return asdict(ledger.stats())
        if name == "keys":
            return dict(ledger.counts)
        if name == "reset":
            ledger.reset()
            return None
        return {"error": f"unknown command {name!r}"}

    def control() -> None:
        """Each command runs on the loop, so it sees the ledger between two messages."""
        for line in sys.stdin:
            name = line.strip()
            if name == "stop":
                break
            answer = asyncio.run_coroutine_threadsafe(command(name), loop).result()
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        loop.call_soon_threadsafe(loop.stop)

    print(server.sockets[0].getsockname()[1], flush=True)
    threading.Thread(target=control, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


class SinkProcess:
    """A sink ("smtp" or "twilio") in a process of its own: `python -m bench.sinks`."""

    def __init__(self, kind: str, latency: float) -> None:
        if kind not in _PROTOCOLS:
            raise ValueError(f"unknown sink {kind!r}")
        self.kind = kind
        self.latency = latency
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 30) -> SinkProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sinks", self.kind, repr(self.latency)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = _readline(self._proc, timeout)
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"{self.kind} sink did not start: {line!r}")
        self.port = int(line)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _ask(self, name: str) -> Any:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                raise RuntimeError(f"{self.kind} sink is not running")
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
            line = _readline(proc, 30)
        if not line:
            raise RuntimeError(f"{self.kind} sink did not answer (exit status {proc.poll()})")
        return json.loads(line)

    def stats(self) -> SinkStats:
        return SinkStats(**self._ask("stats"))

    def keys(self) -> dict[str, int]:
        """Every idempotency key accepted since the last reset, with its count."""
        return self._ask("keys")

    def reset(self) -> None:
        self._ask("reset")

    def wait_for(self, accepted: int, timeout: float, poll: float = 0.02) -> SinkStats:
        """Until `accepted` messages were accepted or `timeout` passed (polling a real
        process with a deadline); returns the last stats either way."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.accepted >= accepted or time.monotonic() > deadline:
                return stats
            time.sleep(poll)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write("stop\n")
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """What a Herald worker needs in its environment to send to this sink."""
        if self.kind == "smtp":
            return {
                "EMAIL_PROVIDER": "smtp",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(self.port),
                "SMTP_STARTTLS": "0",
                "SMTP_USERNAME": "",
                "SMTP_PASSWORD": "",
            }
        return {
            "SMS_PROVIDER": "twilio",
            "TWILIO_API_BASE": f"http://127.0.0.1:{self.port}",
            "TWILIO_ACCOUNT_SID": TWILIO_SID,
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "TWILIO_FROM": TWILIO_FROM,
        }


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the sink's stdout, or "" if none came in time (or it exited). Only
    one answer is ever outstanding, so nothing waits in the text buffer unseen."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]))
