#!/usr/bin/env bash
# Make sure the local PostgreSQL and Redis that Herald needs are running, and that its
# databases exist. Idempotent: when everything is already up it changes nothing.
#
#   scripts/ensure_services.sh test   PostgreSQL + Redis for the test suite, and the test
#                                     databases: TEST_DATABASE_URL's, and
#                                     TEST_MIGRATIONS_DATABASE_URL's (default <name>_migrations)
#   scripts/ensure_services.sh run    only what DATABASE_URL / REDIS_URL name; nothing at
#                                     all for the embedded default (both unset)
#
# A service is started only when its URL points at this machine and it is installed but
# not answering. Remote servers are never touched: they are the operator's.
set -euo pipefail

DEFAULT_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/herald_test"
DEFAULT_TEST_REDIS_URL="redis://127.0.0.1:6379/15"
WAIT_SECONDS="${HERALD_SERVICE_WAIT:-30}"

log() { printf 'ensure_services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# parse_url URL -> prints scheme, host, port, user, password and path (the database name),
# one per line, percent-decoded. python3 is required anyway (the venv is built with it).
parse_url() {
    python3 - "$1" <<'PY'
import sys
from urllib.parse import unquote, urlsplit

u = urlsplit(sys.argv[1])
fields = [
    u.scheme,
    u.hostname or "",
    str(u.port or ""),
    unquote(u.username or ""),
    unquote(u.password or ""),
    unquote(u.path.lstrip("/")),
]
print("\n".join(fields))
PY
}

is_local_host() {
    case "$1" in
        "" | localhost | 127.* | ::1 | "[::1]") return 0 ;;
        *) return 1 ;;
    esac
}

wait_until() {  # wait_until DESCRIPTION COMMAND...
    local what="$1"; shift
    local i
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not answer within ${WAIT_SECONDS}s"
}

# -- PostgreSQL ---------------------------------------------------------------------------

pg_answers() {  # pg_answers HOST PORT
    pg_isready -q -h "$1" -p "$2"
}

start_postgres() {  # start_postgres PORT
    local port="$1" ver cluster cport status started=0
    if ! command -v pg_lsclusters >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1; then
        die "PostgreSQL is not answering on port $port and is not installed here (no pg_ctlcluster)"
    fi
    # pg_lsclusters -h: Ver Cluster Port Status Owner Datadir Logfile
    while read -r ver cluster cport status _; do
        if [[ "$cport" == "$port" && "$status" != online* ]]; then
            log "starting PostgreSQL cluster $ver/$cluster (port $port)"
            pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start \
                || die "could not start PostgreSQL cluster $ver/$cluster"
            started=1
        fi
    done < <(pg_lsclusters -h)
    if [[ "$started" == 0 ]]; then
        die "PostgreSQL is not answering on port $port and no stopped local cluster uses that port"
    fi
}

ensure_postgres() {  # ensure_postgres HOST PORT
    local host="$1" port="$2"
    command -v pg_isready >/dev/null 2>&1 || die "pg_isready not found: install the PostgreSQL client"
    if pg_answers "$host" "$port"; then return 0; fi
    is_local_host "$host" || die "PostgreSQL at $host:$port does not answer (not local: not starting it)"
    start_postgres "$port"
    wait_until "PostgreSQL on $host:$port" pg_answers "$host" "$port"
}

create_database() {  # create_database HOST PORT USER PASSWORD NAME
    local host="$1" port="$2" user="$3" password="$4" name="$5"
    [[ -n "$name" ]] || return 0
    # \gexec runs the CREATE only when the SELECT returns a row: one idempotent statement.
    if ! PGPASSWORD="$password" psql -X -q -w -v ON_ERROR_STOP=1 \
        -h "$host" -p "$port" -U "$user" -d postgres -v dbname="$name" >/dev/null <<'SQL'
SELECT format('CREATE DATABASE %I', :'dbname')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'dbname') \gexec
SQL
    then
        die "could not create database '$name' on $host:$port as '$user'"
    fi
    log "PostgreSQL database '$name' is there ($host:$port)"
}

# ensure_pg_url URL [EXTRA_DB_SUFFIX...]: the server behind URL is up, and its database
# (plus NAME+suffix for each suffix given) exists.
ensure_pg_url() {
    local url="$1"; shift
    local scheme host port user password name suffix parts
    mapfile -t parts < <(parse_url "$url")
    [[ ${#parts[@]} -eq 6 ]] || die "cannot parse URL ${url%%@*}@…"
    scheme="${parts[0]}" host="${parts[1]}" port="${parts[2]}"
    user="${parts[3]}" password="${parts[4]}" name="${parts[5]}"
    case "$scheme" in
        postgres | postgresql | postgresql+*) ;;
        *) log "DATABASE_URL is not PostgreSQL ($scheme): nothing to do"; return 0 ;;
    esac
    host="${host:-127.0.0.1}"
    port="${port:-5432}"
    user="${user:-postgres}"
    if ! is_local_host "$host"; then
        log "PostgreSQL at $host is not local: leaving it (and its databases) to the operator"
        return 0
    fi
    ensure_postgres "$host" "$port"
    command -v psql >/dev/null 2>&1 || die "psql not found: install the PostgreSQL client"
    create_database "$host" "$port" "$user" "$password" "$name"
    for suffix in "$@"; do
        create_database "$host" "$port" "$user" "$password" "${name}${suffix}"
    done
}

# -- Redis --------------------------------------------------------------------------------

redis_answers() {  # redis_answers HOST PORT: PONG, or NOAUTH from a password-protected one
    local out
    out="$(redis-cli -h "$1" -p "$2" ping 2>&1)" || return 1
    [[ "$out" == PONG || "$out" == NOAUTH* ]]
}

start_redis() {  # start_redis PORT
    local port="$1" dir=/var/lib/redis logdir=/var/log/redis logname=ci.log
    [[ "$port" == 6379 ]] || logname="ci-$port.log"
    command -v redis-server >/dev/null 2>&1 \
        || die "Redis is not answering on port $port and redis-server is not installed"
    mkdir -p "$dir" "$logdir" 2>/dev/null || true
    if [[ ! -w "$dir" || ! -w "$logdir" ]]; then
        # Not root and no access to the system directories: keep Redis' files private.
        dir="${TMPDIR:-/tmp}/herald-redis-$port"
        logdir="$dir"
        mkdir -p "$dir"
    fi
    log "starting Redis on 127.0.0.1:$port"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" \
        --appendonly no --dir "$dir" --logfile "$logdir/$logname" \
        || die "could not start redis-server"
}

ensure_redis_url() {  # ensure_redis_url URL
    local url="$1" scheme host port parts
    mapfile -t parts < <(parse_url "$url")
    [[ ${#parts[@]} -eq 6 ]] || die "cannot parse URL ${url%%@*}@…"
    scheme="${parts[0]}" host="${parts[1]}" port="${parts[2]}"
    if [[ "$scheme" != redis ]]; then
        log "REDIS_URL scheme is $scheme, not redis: nothing to do"
        return 0
    fi
    host="${host:-127.0.0.1}"
    port="${port:-6379}"
    if ! is_local_host "$host"; then
        log "Redis at $host is not local: leaving it to the operator"
        return 0
    fi
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found: install Redis"
    if redis_answers "$host" "$port"; then return 0; fi
    start_redis "$port"
    wait_until "Redis on $host:$port" redis_answers "$host" "$port"
    log "Redis answers on $host:$port"
}

# -- main ---------------------------------------------------------------------------------

mode="${1:-}"
case "$mode" in
    test)
        if [[ -n "${TEST_MIGRATIONS_DATABASE_URL:-}" ]]; then
            ensure_pg_url "${TEST_DATABASE_URL:-$DEFAULT_TEST_DATABASE_URL}"
            ensure_pg_url "$TEST_MIGRATIONS_DATABASE_URL"
        else
            ensure_pg_url "${TEST_DATABASE_URL:-$DEFAULT_TEST_DATABASE_URL}" _migrations
        fi
        ensure_redis_url "${TEST_REDIS_URL:-$DEFAULT_TEST_REDIS_URL}"
        ;;
    run)
        if [[ -n "${DATABASE_URL:-}" ]]; then
            ensure_pg_url "$DATABASE_URL"
        fi
        if [[ -n "${REDIS_URL:-}" ]]; then
            ensure_redis_url "$REDIS_URL"
        fi
        if [[ -z "${DATABASE_URL:-}${REDIS_URL:-}" ]]; then
            log "embedded default (no DATABASE_URL / REDIS_URL): no services needed"
        fi
        ;;
    *)
        echo "usage: $0 test|run" >&2
        exit 2
        ;;
esac
