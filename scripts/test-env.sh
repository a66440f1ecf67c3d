#!/usr/bin/env bash
# Makes PostgreSQL and Redis available for the test suite, then runs the command given.
#
# - Reuses PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 when they answer (or the
#   servers named by CLIENTELE_TEST_DATABASE_URL / CLIENTELE_TEST_REDIS_URL).
# - Otherwise starts throwaway ones from the local binaries on free ports, in a temporary
#   folder that is removed on exit.
# - Otherwise, when running as root with apt-get, installs Debian's postgresql and
#   redis-server packages first; failing that, says exactly what to install.
set -euo pipefail

scratch=$(mktemp -d -t clientele-test-XXXXXX)
pids=()
run_db=
cleanup() {
  if [ -n "$run_db" ]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists $run_db with (force)" >/dev/null 2>&1 || true
  fi
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  if [ -n "${PGCTL:-}" ] && [ -d "$scratch/pg" ]; then
    as_pg "$PGCTL" -D "$scratch/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT

say() { echo "test-env: $*" >&2; }

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

find_pg_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  ls /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    local user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    chown -R "$user" "$scratch"
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

install_missing() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $* with apt-get"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

# --- PostgreSQL ---------------------------------------------------------------------------
if [ -z "${CLIENTELE_TEST_DATABASE_URL:-}" ]; then
  if port_open 5432 && psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    # A database per run: tests create a schema each, and dropping the database at exit
    # removes them all, so repeated runs leave nothing behind.
    run_db="clientele_test_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    say "reusing PostgreSQL on 127.0.0.1:5432 (database $run_db for this run)"
    psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $run_db"
    export CLIENTELE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$run_db"
  else
    INITDB=$(find_pg_bin initdb || true); PGCTL=$(find_pg_bin pg_ctl || true)
    if [ -z "$INITDB" ] || [ -z "$PGCTL" ]; then
      install_missing postgresql || { say "PostgreSQL is not running and not installed: install PostgreSQL 15+ (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@15) or set CLIENTELE_TEST_DATABASE_URL"; exit 1; }
      INITDB=$(find_pg_bin initdb); PGCTL=$(find_pg_bin pg_ctl)
    fi
    port=$(free_port)
    say "starting a throwaway PostgreSQL on 127.0.0.1:$port"
    mkdir -p "$scratch/pg"
    as_pg "$INITDB" -D "$scratch/pg" -U postgres -A trust >/dev/null
    as_pg "$PGCTL" -D "$scratch/pg" -o "-p $port -k $scratch -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" -l "$scratch/pg.log" -w start >/dev/null
    PG_BIN=$(dirname "$INITDB")
    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres test 2>/dev/null || psql -h 127.0.0.1 -p "$port" -U postgres -qc 'create database test'
    export CLIENTELE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/test"
  fi
fi

# --- Redis --------------------------------------------------------------------------------
if [ -z "${CLIENTELE_TEST_REDIS_URL:-}" ]; then
  if port_open 6379; then
    say "reusing Redis on 127.0.0.1:6379"
    export CLIENTELE_TEST_REDIS_URL=redis://127.0.0.1:6379
  else
    command -v redis-server >/dev/null 2>&1 || install_missing redis-server \
      || { say "Redis is not running and not installed: install Redis 7 (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set CLIENTELE_TEST_REDIS_URL"; exit 1; }
    port=$(free_port)
    say "starting a throwaway Redis on 127.0.0.1:$port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$scratch" >/dev/null &
    pids+=($!)
    for _ in $(seq 50); do port_open "$port" && break; sleep 0.1; done
    export CLIENTELE_TEST_REDIS_URL="redis://127.0.0.1:$port"
  fi
fi

command -v redis-server >/dev/null 2>&1 || install_missing redis-server || say "warning: redis-server is not on PATH; the Redis outage test needs it"

"$@"
