"""docker-compose.yml and the Procfile name things that really exist in this repository.

Docker is not run here: these tests read the files and check every command against the
code (the gunicorn factory, the Celery app and its queues, Alembic's scripts), so a rename
in api/ or workers/ breaks a test instead of a deployment.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROCFILE = ROOT / "Procfile"

INFRA_SERVICES = {"postgres", "redis"}
APP_SERVICES = {"migrate", "api", "worker", "beat", "flower"}
LONG_RUNNING = APP_SERVICES - {"migrate"}
PROCFILE_PROCESSES = {"api", "worker", "beat", "flower"}


# -- loading ------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment_of(svc: dict) -> dict[str, object]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", "NAME"]
        pairs = (item.partition("=") for item in env)
        return {name: (value if sep else None) for name, sep, value in pairs}
    return dict(env)


_DEFAULT_EXPANSION = re.compile(r"\$\{(\w+):?-([^}]*)\}")


def expand_defaults(line: str) -> str:
    """${NAME:-default} -> default: the Procfile as it runs with nothing set."""
    return _DEFAULT_EXPANSION.sub(lambda m: m.group(2), line)


@cache
def procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for raw in PROCFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"Procfile line without 'name: command': {raw!r}"
        assert name.strip() not in processes, f"duplicate Procfile process {name!r}"
        processes[name.strip()] = command.strip()
    return processes


def procfile_argv(name: str) -> list[str]:
    return shlex.split(expand_defaults(procfile()[name]))


# -- what the commands name ---------------------------------------------------------------


def option(argv: list[str], *names: str) -> str | None:
    """The value of --opt VALUE / --opt=VALUE / -o VALUE, or None."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


@cache
def celery_app(module_name: str):
    from celery import Celery

    module = importlib.import_module(module_name)
    for attr in ("app", "celery"):
        candidate = getattr(module, attr, None)
        if isinstance(candidate, Celery):
            return candidate
    raise AssertionError(f"module {module_name!r} exposes no celery.Celery as `app` or `celery`")


def declared_queue_names(app) -> set[str]:
    queues = app.conf.task_queues
    assert queues, "the Celery app declares no conf.task_queues"
    if isinstance(queues, dict):
        return set(queues)
    return {q.name for q in queues}


def worker_queues(argv: list[str]) -> set[str]:
    value = option(argv, "-Q", "--queues")
    assert value, f"worker consumes no explicit queues (-Q): {argv}"
    return {q.strip() for q in value.split(",") if q.strip()}


_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(\))?$")


def check_gunicorn(argv: list[str]) -> None:
    assert importlib.util.find_spec("gunicorn"), "gunicorn is not installed"
    targets = [a for a in argv[1:] if _APP_SPEC.match(a)]
    assert targets, f"gunicorn command names no app: {argv}"
    module_name, _, attr = targets[0].partition(":")
    factory = attr.removesuffix("()")
    module = importlib.import_module(module_name)
    target = getattr(module, factory, None)
    assert callable(target), f"{module_name}:{factory} is not callable"
    assert option(argv, "--bind", "-b"), "gunicorn must be told where to listen (--bind)"


def check_celery(argv: list[str]) -> None:
    assert importlib.util.find_spec("celery"), "celery is not installed"
    app_name = option(argv, "-A", "--app")
    assert app_name, f"celery command names no app (-A): {argv}"
    app = celery_app(app_name)
    subcommand = next(
        (a for a in argv[1:] if a in {"worker", "beat", "flower", "events", "inspect"}), None
    )
    assert subcommand in {"worker", "beat", "flower"}, f"unexpected celery command: {argv}"
    if subcommand == "worker":
        declared = declared_queue_names(app)
        undeclared = worker_queues(argv) - declared
        assert not undeclared, f"worker consumes queues the app does not declare: {undeclared}"
    if subcommand == "flower":
        assert importlib.util.find_spec("flower"), "flower is not installed"


def check_alembic(argv: list[str]) -> None:
    assert argv[1:] == ["upgrade", "head"], f"migrations should run `alembic upgrade head`: {argv}"
    assert importlib.util.find_spec("alembic"), "alembic is not installed"
    ini = ROOT / "alembic.ini"
    assert ini.is_file(), "alembic.ini is missing"
    parser = configparser.ConfigParser(defaults={"here": str(ROOT)})
    parser.read(ini)
    location = parser.get("alembic", "script_location", fallback=None)
    assert location, "alembic.ini has no [alembic] script_location"
    scripts = Path(location) if Path(location).is_absolute() else ROOT / location
    assert (scripts / "env.py").is_file(), f"{scripts}/env.py is missing"


def check_entry_point(argv: list[str]) -> None:
    assert argv, "empty command"
    program = argv[0]
    if program == "gunicorn":
        check_gunicorn(argv)
    elif program == "celery":
        check_celery(argv)
    elif program == "alembic":
        check_alembic(argv)
    else:
        raise AssertionError(f"unknown program {program!r} in {argv}")


# -- docker-compose.yml -------------------------------------------------------------------


def test_compose_has_the_seven_services():
    assert set(compose()["services"]) == INFRA_SERVICES | APP_SERVICES


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_compose_app_service_names_a_real_entry_point(name):
    check_entry_point(argv_of(service(name)["command"]))


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_compose_app_services_share_one_image_and_environment(name):
    svc = service(name)
    assert svc.get("build") == ".", f"{name} must build from the repository's Dockerfile"
    env = environment_of(svc)
    assert env.get("DATABASE_URL") == "postgresql://postgres:postgres@postgres:5432/herald"
    assert env.get("REDIS_URL") == "redis://redis:6379/0"
    assert env.get("HERALD_ENV") == "production"
    for secret in ("SECRET_KEY", "JWT_SECRET_KEY", "ENCRYPTION_KEY"):
        value = str(env.get(secret) or "")
        assert value.startswith("${" + secret + ":?"), f"{name}: {secret} must be required"


def test_compose_dockerfile_exists():
    assert (ROOT / "Dockerfile").is_file()


def test_compose_postgres_healthcheck_and_migrate_ordering():
    health = argv_of(service("postgres")["healthcheck"]["test"])
    assert any("pg_isready" in part for part in health)
    assert service("migrate")["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_compose_long_running_services_wait_for_migrations(name):
    depends = service(name)["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_compose_flower_requires_basic_auth():
    env = environment_of(service("flower"))
    assert "FLOWER_BASIC_AUTH" in env
    assert str(env["FLOWER_BASIC_AUTH"]).startswith("${FLOWER_BASIC_AUTH:?")
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def _dockerfile_workdir() -> PurePosixPath:
    workdir = PurePosixPath("/")
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "WORKDIR":
            workdir = workdir / parts[1].strip()
    return workdir


def test_compose_beat_schedule_is_outside_the_code():
    argv = argv_of(service("beat")["command"])
    schedule = option(argv, "--schedule", "-s")
    assert schedule, "beat must be given --schedule"
    path = PurePosixPath(schedule)
    assert path.is_absolute(), "a relative schedule would land in the image's copy of the repo"
    workdir = _dockerfile_workdir()
    assert workdir not in path.parents, f"{schedule} is inside the app directory {workdir}"


def test_compose_and_procfile_worker_consume_every_queue():
    from engine.settings import QUEUES

    assert worker_queues(argv_of(service("worker")["command"])) == set(QUEUES)
    assert worker_queues(procfile_argv("worker")) == set(QUEUES)


def test_celery_app_declares_exactly_the_queues_the_worker_consumes():
    """A declared queue nobody consumes would hold its tasks forever."""
    argv = procfile_argv("worker")
    app = celery_app(option(argv, "-A", "--app"))
    assert declared_queue_names(app) == worker_queues(argv)


# -- Procfile -----------------------------------------------------------------------------


def test_procfile_has_api_worker_beat_flower():
    assert set(procfile()) == PROCFILE_PROCESSES


@pytest.mark.parametrize("name", sorted(PROCFILE_PROCESSES))
def test_procfile_process_names_a_real_entry_point(name):
    check_entry_point(procfile_argv(name))


def test_procfile_services_listen_on_loopback_by_default():
    assert option(procfile_argv("api"), "--bind", "-b").startswith("127.0.0.1:")
    assert option(procfile_argv("flower"), "--address") == "127.0.0.1"


def test_procfile_beat_schedule_is_not_tracked():
    schedule = option(procfile_argv("beat"), "--schedule", "-s")
    assert schedule, "beat must be given --schedule"
    path = Path(schedule)
    if path.is_absolute():
        return
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", schedule], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, f"{schedule} is not ignored by .gitignore"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", schedule],
        cwd=ROOT,
        check=False,
        capture_output=True,
    )
    assert tracked.returncode != 0, f"{schedule} is tracked by git"


# -- the README documents every setting ---------------------------------------------------


def test_readme_documents_every_environment_variable_of_settings():
    source = (ROOT / "engine" / "settings.py").read_text()
    names = set(re.findall(r"_env_(?:str|int|float|bool)\(\s*\"([A-Z0-9_]+)\"", source))
    if "_RATE_PER_SECOND" in source:
        from engine.settings import CHANNELS

        names |= {f"{c.upper()}_RATE_PER_SECOND" for c in CHANNELS}
    assert names, "found no environment variables in engine/settings.py"
    readme = (ROOT / "README.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"README.md's configuration table lacks: {missing}"
