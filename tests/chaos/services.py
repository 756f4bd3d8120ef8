"""Private services and real Herald processes for the chaos tests.

Plain classes (no pytest in here): a PostgreSQL cluster made with initdb and driven by
pg_ctl, a `redis-server` that can be stopped and started again on the same port, and
`celery worker` / `celery beat` subprocesses, each in its own process group so a test
can kill a worker's parent and pool processes together, as the kernel's OOM killer or a
host crash would.

PostgreSQL refuses to run as root, so when the tests run as root (a container) initdb
and pg_ctl run as the `postgres` user, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(ROOT / ".venv" / "bin" / "celery")
PG_BIN = Path(os.environ.get("HERALD_PG_BIN", "/usr/lib/postgresql/15/bin"))
QUEUES = "email,sms,push,whatsapp,sync,default"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` (a real process's state) until it is truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- PostgreSQL ------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway cluster on 127.0.0.1:<port>, fsync off (its data dies with the test)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="herald-chaos-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sock"
        self.log = self.base / "postgres.log"
        self.port = free_port()
        self._owner: dict = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            self._owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.sockets.mkdir()
        if self._owner:
            os.chown(self.sockets, self._owner["user"], self._owner["group"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [str(PG_BIN / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._owner,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} {args[1:]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                f"\n{tail(self.log)}"
            )

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c synchronous_commit=off"
        )

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every open session is terminated."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
            "-m", "fast", "-w", "-t", "60", "restart",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        """Stop (if running) and delete everything; safe after a failed start."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


# -- Redis -----------------------------------------------------------------------------


class RedisServer:
    """`redis-server` with no persistence, like the deployment's: a restart loses every
    queued task, which is what reconciliation exists for."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server", "--port", str(self.port), "--save", "",
                    "--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(self.workdir),
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{tail(self.log)}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, 15, "redis-server to answer PING")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --save '': nothing is written
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- Celery ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread or process just ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


class CeleryProcess:
    """A `celery` command in its own process group (its pgid is its pid)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [CELERY, "-A", "workers", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def signal_parent(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def group_alive(self) -> bool:
        """Any process of the group still running (pool processes can outlive a dead
        parent). Zombies do not count: an orphan is reaped whenever init gets to it."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(pgrp) == self.pid and state != "Z":
                return True
        return False

    def kill(self) -> None:
        """SIGKILL the whole group and reap the parent: teardown, whatever state it is in."""
        self.signal_group(signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not self.group_alive(), 10, f"{self.name}'s group to die")


class Worker(CeleryProcess):
    def __init__(self, name: str, env: dict[str, str], log: Path, concurrency: int) -> None:
        self.concurrency = concurrency
        super().__init__(
            name,
            [
                "worker", "-Q", QUEUES, "-P", "prefork", "--concurrency", str(concurrency),
                "-n", f"{name}@%h", "--loglevel", "INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            env,
            log,
        )  # fmt: skip

    def pool_pids(self) -> list[int]:
        return children(self.pid)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"worker {self.name} exited:\n{tail(self.log)}")
            return " ready." in self.log_text() and len(self.pool_pids()) >= self.concurrency

        wait_until(ready, timeout, f"worker {self.name} to be ready", interval=0.1)


class Beat(CeleryProcess):
    def __init__(self, name: str, env: dict[str, str], log: Path, schedule: Path) -> None:
        super().__init__(name, ["beat", "-s", str(schedule), "--loglevel", "INFO"], env, log)

    def sent(self, task: str) -> int:
        """How many times this beat has sent the schedule entry `task` (its log says so)."""
        return self.log_text().count(f"Sending due task {task}")
