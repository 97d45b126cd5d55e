# Shared set-up for scripts/run.sh and scripts/test.sh (sourced, not run).

# Installs the PostgreSQL server package when no server binaries are found.
ensure_postgres() {
  if [ -n "${TASKWARDEN_PG_BINDIR:-}" ] && [ -x "$TASKWARDEN_PG_BINDIR/initdb" ]; then return 0; fi
  if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    return 0
  fi
  echo "PostgreSQL server binaries not found; installing the Debian package 'postgresql'" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql
}

# Installs Prometheus (with promtool) for the operations tests when missing.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  echo "prometheus/promtool not found; installing the Debian package 'prometheus'" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends prometheus
}

# Installs systemd-analyze (the operations tests verify the unit with it) when missing.
ensure_systemd_analyze() {
  if command -v systemd-analyze >/dev/null 2>&1; then return 0; fi
  echo "systemd-analyze not found; installing the Debian package 'systemd'" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends systemd
}

# Installs pgbouncer (the pooler tests run Debian's 1.18 in front of the test server).
ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then return 0; fi
  echo "pgbouncer not found; installing the Debian package 'pgbouncer'" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends pgbouncer
}

# Makes a fresh virtualenv at $1 and pip-installs the rest of the arguments into it,
# installing python3-venv first where Debian's python3 lacks it.
make_venv() {
  local venv="$1"
  shift
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends python3-venv
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$@"
}

# Installs schemathesis (PyPI, pinned) into a virtualenv under the user's cache for
# tests/openapi.rs and exports TASKWARDEN_SCHEMATHESIS with its path.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/taskwarden/schemathesis-$SCHEMATHESIS_VERSION"
  if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION from PyPI into $venv" >&2
    make_venv "$venv" "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export TASKWARDEN_SCHEMATHESIS="$venv/bin/schemathesis"
}

# Installs the Python packages of examples/clients (SQLAlchemy, asyncpg, psycopg; pinned in
# examples/clients/requirements.txt) into a virtualenv under the user's cache, named by the
# file's hash so a change installs afresh, and node-postgres into examples/clients/node;
# exports TASKWARDEN_CLIENTS_PYTHON (tests/clients.rs and tests/first_seed.rs run them).
ensure_clients() {
  local sum venv
  sum=$(sha256sum examples/clients/requirements.txt | cut -c1-12)
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/taskwarden/clients-$sum"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sqlalchemy, asyncpg, psycopg' >/dev/null 2>&1; then
    echo "installing the client examples' packages from PyPI into $venv" >&2
    make_venv "$venv" -r examples/clients/requirements.txt
  fi
  export TASKWARDEN_CLIENTS_PYTHON="$venv/bin/python"
  if [ ! -d examples/clients/node/node_modules/pg ]; then
    echo "installing node-postgres into examples/clients/node/node_modules (npm ci)" >&2
    npm ci --prefix examples/clients/node --no-audit --no-fund
  fi
}

# Installs Debian's Chromium (the console test drives it; never a downloaded browser).
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  echo "chromium not found; installing the Debian package 'chromium'" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium
}

# Installs playwright-core (npm, pinned by tests/ui/package-lock.json) for tests/ui.rs.
ensure_playwright() {
  if [ -d tests/ui/node_modules/playwright-core ]; then return 0; fi
  echo "installing playwright-core into tests/ui/node_modules (npm ci)" >&2
  npm ci --prefix tests/ui --no-audit --no-fund
}

# Prints the newest PostgreSQL bin directory.
pg_bindir() {
  if [ -n "${TASKWARDEN_PG_BINDIR:-}" ]; then echo "$TASKWARDEN_PG_BINDIR"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1
}
