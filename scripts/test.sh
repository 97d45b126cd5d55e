#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL: one throwaway cluster for the run
# (initdb into a temp dir, unix socket only, durability off), each test in its own
# database. Set TASKWARDEN_TEST_DATABASE_URL to use an existing server instead.
# Installs PostgreSQL, Prometheus (the operations tests scrape with a real one),
# systemd-analyze (they verify the unit with it) and pgbouncer (the pooler tests) with
# apt-get when they are missing, schemathesis (the OpenAPI test) from PyPI, and Chromium
# (Debian's) with playwright-core (npm) for the console test, and the client examples'
# packages (SQLAlchemy, asyncpg, psycopg from PyPI; node-postgres from npm).
# Extra arguments go to the test runner. Last, scripts/systemd-e2e.sh tests the systemd
# unit on a booted minimal Debian (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_postgres
ensure_prometheus
ensure_systemd_analyze
ensure_pgbouncer
ensure_schemathesis
ensure_chromium
ensure_playwright
ensure_clients

if [ -z "${TASKWARDEN_TEST_DATABASE_URL:-}" ]; then
  bindir=$(pg_bindir)
  dir=$(mktemp -d /tmp/taskwarden-test-pg.XXXXXX)
  as=()
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    pguser=postgres; id "$pguser" >/dev/null 2>&1 || pguser=nobody
    chown "$pguser" "$dir"
    as=(runuser -u "$pguser" --)
  fi
  cleanup() {
    "${as[@]}" "$bindir/pg_ctl" -D "$dir/pgdata" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
  }
  trap cleanup EXIT
  "${as[@]}" "$bindir/initdb" -D "$dir/pgdata" -U taskwarden --auth=trust -E UTF8 --locale=C --no-instructions >/dev/null
  "${as[@]}" "$bindir/pg_ctl" -D "$dir/pgdata" -l "$dir/postgresql.log" -w -t 60 \
    -o "-k $dir -p 5432 -c listen_addresses= -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=96MB -c min_wal_size=32MB" \
    start >/dev/null
  export TASKWARDEN_TEST_DATABASE_URL="postgresql://taskwarden@/postgres?host=$dir&port=5432"
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast "$@"
fi
# The embedding example must keep working, not only build.
cargo run --locked --quiet --example embed_agent

# The systemd unit on a booted minimal Debian 12, installed as README says. It needs root
# and systemd-nspawn; where it cannot run, scripts/systemd-e2e.sh says so and skips —
# unless TASKWARDEN_REQUIRE_SYSTEMD_E2E=1 (.ci/run sets it), which makes that a failure.
# TASKWARDEN_SYSTEMD_E2E=0, or a filtered run (extra arguments), leaves it out.
if [ "${TASKWARDEN_SYSTEMD_E2E:-1}" = 0 ] || [ $# -gt 0 ]; then
  if [ "${TASKWARDEN_REQUIRE_SYSTEMD_E2E:-0}" = 1 ]; then
    echo "the systemd end-to-end test is required (TASKWARDEN_REQUIRE_SYSTEMD_E2E=1) but was left out" >&2
    exit 1
  fi
  echo "systemd end-to-end test left out (TASKWARDEN_SYSTEMD_E2E=0 or a filtered run)" >&2
else
  ./scripts/systemd-e2e.sh
fi
