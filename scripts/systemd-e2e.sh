#!/usr/bin/env bash
# The systemd unit, tested under a booted systemd on a minimal Debian 12.
#
# Builds the release binary as README.md says, boots a minimal Debian 12 (debootstrap
# --variant=minbase with systemd and the PostgreSQL server only) with `systemd-nspawn -b`
# on a private network, runs README's "Install as a service" commands in it literally
# (the sh block between the `install-begin`/`install-end` markers), and checks what the
# unit promises: start → active and ready; the CLI answers and a task runs; agents and the
# postmaster do not inherit NOTIFY_SOCKET; a query forced through JIT works; reload of a
# valid file applies it and exits 0, reload of an invalid one exits non-zero and keeps the
# running config; a SIGSTOPped daemon is restarted by systemd's watchdog; stop is clean
# and leaves no task running; the journal has no unexpected ERROR and no "reception only
# permitted" line.
#
# Needs root, debootstrap and systemd-nspawn (installed with apt-get when missing). The
# root filesystem is built once and cached as a tarball in $TASKWARDEN_CI_CACHE
# (default /var/cache/taskwarden-ci); each run unpacks a fresh copy and deletes it.
# When the machine cannot run this (not root, no apt), it says so and exits 0 — unless
# TASKWARDEN_REQUIRE_SYSTEMD_E2E=1 (CI sets it), then it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,postgresql-15
MIRROR=${TASKWARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${TASKWARDEN_CI_CACHE:-/var/cache/taskwarden-ci}
WATCHDOG_MARGIN=30

started=$(date +%s)
phase_started=$started
say() { printf '[systemd-e2e %4ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
phase() {
  local now; now=$(date +%s)
  say "$* (previous phase took $((now - phase_started))s)"
  phase_started=$now
}
die() { say "FAIL: $*"; exit 1; }
skipped=0

unable() {
  if [ "${TASKWARDEN_REQUIRE_SYSTEMD_E2E:-0}" = 1 ]; then
    die "cannot run the systemd end-to-end test here: $* (TASKWARDEN_REQUIRE_SYSTEMD_E2E=1)"
  fi
  say "SKIPPED: cannot run the systemd end-to-end test here: $*"
  say "SKIPPED: set TASKWARDEN_REQUIRE_SYSTEMD_E2E=1 to make this a failure"
  skipped=1
  exit 0
}

[ "$(uname -s)" = Linux ] || unable "not Linux"
[ "$(id -u)" = 0 ] || unable "needs root (debootstrap, systemd-nspawn)"
if ! command -v debootstrap >/dev/null 2>&1 || ! command -v systemd-nspawn >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || unable "debootstrap/systemd-nspawn missing and no apt-get"
  say "installing debootstrap and systemd-container"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap systemd-container >/dev/null
fi

# --- the root filesystem, cached ---------------------------------------------------------
mkdir -p "$CACHE"
key=$(printf '%s\n' "$SUITE" minbase "$INCLUDE" v1 | sha256sum | cut -c1-16)
tarball="$CACHE/rootfs-$SUITE-$key.tar"
build_rootfs() {
  local dir="$CACHE/build.$$"
  rm -rf --one-file-system "$dir"
  say "debootstrap $SUITE (minbase + $INCLUDE) into $dir; cached as $tarball afterwards"
  if ! timeout 1200 debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$dir" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 30 "$CACHE/debootstrap.log" >&2
    rm -rf --one-file-system "$dir"
    unable "debootstrap failed (log: $CACHE/debootstrap.log)"
  fi
  rm -f "$dir"/var/cache/apt/archives/*.deb
  tar -C "$dir" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf --one-file-system "$dir"
}
(
  # One builder at a time; the others wait for its tarball.
  flock -w 1500 9 || die "timed out waiting for the rootfs cache lock"
  [ -s "$tarball" ] || build_rootfs
) 9>"$CACHE/lock"
[ -s "$tarball" ] || unable "no root filesystem"
phase "root filesystem ready ($tarball)"

if [ "${1:-}" = --rootfs-only ]; then exit 0; fi

# The whole test after this point is bounded (the build and the rootfs have their own).
BUDGET=${TASKWARDEN_SYSTEMD_E2E_BUDGET:-900}

# --- the binary, built as README says ----------------------------------------------------
say "cargo build --release --locked"
cargo build --release --locked --bin taskwarden
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
bin="$target_dir/release/taskwarden"
[ -x "$bin" ] || die "no binary at $bin"
phase "built $bin"

# README's install commands, verbatim.
install_sh=$(awk '/<!-- install-begin -->/{f=1;next} /<!-- install-end -->/{f=0} f' README.md | sed '/^```/d')
[ -n "$install_sh" ] || die "README.md has no install block between <!-- install-begin --> and <!-- install-end -->"

# --- a fresh machine ---------------------------------------------------------------------
work=$(mktemp -d /var/tmp/taskwarden-e2e.XXXXXX)
root="$work/root"
machine="tw-e2e-$$"
nspawn_pid=""
leader=""
alarm_pid=""

# Runs a command inside the booted machine: all its namespaces, its root, a clean env.
T=60
cexec() {
  timeout -k 5 "$T" nsenter --target "$leader" --mount --uts --ipc --net --pid --root --wd \
    /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 HOME=/root "$@"
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$alarm_pid" ] && kill "$alarm_pid" 2>/dev/null
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    if [ "$rc" != 0 ] && [ -n "$leader" ]; then
      say "--- systemctl status taskwarden (on failure) ---"
      T=15 cexec systemctl status --no-pager --full taskwarden >&2 || true
      say "--- journal of taskwarden (last 150 lines) ---"
      T=15 cexec journalctl --no-pager -n 150 -u taskwarden >&2 || true
      say "--- embedded PostgreSQL log (last 30 lines) ---"
      T=15 cexec sh -c 'tail -n 30 /var/lib/taskwarden/postgresql.log /var/lib/private/taskwarden/postgresql.log 2>/dev/null' >&2 || true
    fi
    if [ "$rc" != 0 ] && [ -n "$leader" ] && [ -n "${TASKWARDEN_E2E_HOLD:-}" ]; then
      say "holding the machine for ${TASKWARDEN_E2E_HOLD}s: nsenter --target $leader --all --root --wd"
      sleep "$TASKWARDEN_E2E_HOLD" || true
    fi
    if [ -n "$leader" ]; then T=15 cexec systemctl --no-block poweroff >/dev/null 2>&1 || true; fi
    for _ in $(seq 1 60); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$nspawn_pid" 2>/dev/null; then
      say "machine did not power off within 30 s; killing it"
      [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null
      sleep 1
      kill -KILL "$nspawn_pid" 2>/dev/null
    fi
    wait "$nspawn_pid" 2>/dev/null || true
    say "machine stopped"
  fi
  rm -rf --one-file-system "$work"
  say "removed $work"
  if [ "$skipped" = 1 ]; then
    :
  elif [ "$rc" = 0 ]; then
    say "PASS: systemd end-to-end test in $(($(date +%s) - started))s"
  else
    say "FAIL (exit $rc) after $(($(date +%s) - started))s"
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'say "time budget of ${BUDGET}s exhausted"; exit 124' TERM
# The alarm: TERM ends it and its sleep (teardown does), else it ends the test.
(
  trap 'kill "$s" 2>/dev/null; exit 0' TERM
  sleep "$BUDGET" &
  s=$!
  wait "$s" && kill -TERM $$
) 2>/dev/null &
alarm_pid=$!

mkdir "$root"
tar -C "$root" -xf "$tarball"
# The repository's files (tracked and new, not ignored) at /src, with the binary where
# `cargo build --release` puts it, so README's commands run unchanged from /src.
mkdir -p "$root/src/target/release"
git ls-files -z --cached --others --exclude-standard | tar -C "$repo" --null -T - -cf - | tar -C "$root/src" -xf -
cp "$bin" "$root/src/target/release/taskwarden"
printf '%s\n' "$install_sh" >"$root/src/.install-from-readme.sh"
phase "machine unpacked in $root"

# No machined or system bus is needed (CI hosts often have no systemd as pid 1): no
# registration, no scope unit. A private network keeps port 9187 off the host.
systemd-nspawn --quiet --boot --directory="$root" --machine="$machine" --register=no --keep-unit \
  --private-network --console=read-only >"$work/console.log" 2>&1 &
nspawn_pid=$!
# A machine that cannot boot is this host's limit (no privileges, no cgroups), not the
# unit's: skipped where allowed, a failure in CI.
for _ in $(seq 1 100); do
  kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/console.log" >&2; unable "systemd-nspawn exited"; }
  # The machine's init: nspawn's child that is pid 1 in its own pid namespace.
  for st in /proc/[0-9]*/status; do
    if grep -q "^PPid:[[:space:]]*$nspawn_pid\$" "$st" 2>/dev/null &&
      grep -Eq '^NSpid:.*[[:space:]]1$' "$st" 2>/dev/null; then
      leader=$(basename "$(dirname "$st")")
    fi
  done
  [ -n "$leader" ] && break
  sleep 0.2
done
[ -n "$leader" ] || unable "cannot find the machine's init process"
# Until the machine's systemd listens, systemctl cannot connect and prints no state.
state=""
for _ in $(seq 1 180); do
  state=$(T=90 cexec systemctl is-system-running --wait 2>/dev/null || true)
  [ -n "$state" ] && break
  sleep 0.5
done
case "$state" in
  running) ;;
  degraded) say "booted degraded; failed units:"; T=10 cexec systemctl --failed --no-pager >&2 || true ;;
  *) cat "$work/console.log" >&2; unable "the machine did not boot (state: ${state:-none})" ;;
esac
phase "booted systemd $(T=10 cexec systemctl --version | head -n 1 | cut -d' ' -f2) (state $state)"

# --- helpers -----------------------------------------------------------------------------
CONFIG=/etc/taskwarden/config.toml
unit() { T=15 cexec systemctl show -p "$1" --value taskwarden; }
# GET on the daemon's listener from inside (bash's /dev/tcp: no curl on a minimal system).
http_get() {
  T=15 cexec bash -c 'exec 3<>/dev/tcp/127.0.0.1/9187 || exit 7
    printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$1" >&3
    timeout 10 cat <&3' _ "$1"
}
http_code() { http_get "$1" 2>/dev/null | head -n 1 | cut -d' ' -f2; }
status_json() { http_get /v1/status | sed '1,/^\r\{0,1\}$/d'; }
tw() { T=30 cexec taskwarden "$@" --config "$CONFIG"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 t0; shift 2; t0=$(date +%s)
  while ! "$@" >/dev/null 2>&1; do
    [ $(($(date +%s) - t0)) -lt "$limit" ] || die "not within ${limit}s: $what"
    sleep 0.5
  done
  say "ok: $what (after $(($(date +%s) - t0))s)"
}
span_s() { # a systemd time span ("1min 30s") in whole seconds
  local total=0 tok n
  for tok in $1; do
    n=${tok%%[a-z]*}
    case "${tok#"$n"}" in
      h) total=$((total + n * 3600)) ;;
      min) total=$((total + n * 60)) ;;
      s) total=$((total + n)) ;;
      ms | us) ;;
      *) die "cannot read the time span $1" ;;
    esac
  done
  echo "$total"
}
is_active() { [ "$(unit ActiveState)" = active ] && [ "$(unit SubState)" = running ]; }
is_ready() { is_active && [ "$(http_code /readyz)" = 200 ]; }
task_field() { # task_field ID: the task's JSON
  http_get "/v1/tasks/$1" | sed '1,/^\r\{0,1\}$/d'
}
task_has() { task_field "$1" | grep -q "$2"; }
submit() { # submit AGENT PAYLOAD → prints the task id
  tw submit --agent "$1" --payload "$2" --json | sed -n 's/^  "id": \([0-9]*\),*$/\1/p'
}
# As README says an operator reaches the embedded server.
psql_embedded() {
  T=60 cexec runuser -u taskwarden -- psql -h /var/lib/taskwarden/pgdata -d taskwarden \
    -X -q -At -v ON_ERROR_STOP=1 "$@"
}

# --- install exactly as README says, then start ------------------------------------------
say "running README's install commands:"
printf '%s\n' "$install_sh" | sed 's/^/    /' >&2
t_install=$(date +%s)
T=150 cexec sh -c 'cd /src && sh -eux ./.install-from-readme.sh' || die "README's install commands failed"
# `systemctl enable --now` returns once READY=1 came (initdb included): ready within 30 s
# of the install's start.
left=$((30 - ($(date +%s) - t_install)))
[ "$left" -gt 0 ] || die "not started within 30 s of the install"
wait_for "$left" "taskwarden active (running) and /readyz 200, $((30 - left))s after the install began" is_ready
phase "installed and started"
T=15 cexec systemctl status --no-pager taskwarden >&2 || true

out=$(tw status) || die "taskwarden status failed"
printf '%s\n' "$out" | head -n 5 >&2
say "ok: taskwarden status answers"

id=$(submit echo '{"hello":"world"}')
[ -n "$id" ] || die "submit printed no task id"
wait_for 30 "task $id (agent echo) succeeded" task_has "$id" '"status":"succeeded"'

# Children must not talk to systemd: the postmaster's environment.
pm=$(T=10 cexec head -n 1 /var/lib/taskwarden/pgdata/postmaster.pid)
leaked=$(T=10 cexec sh -c "tr '\0' '\n' </proc/$pm/environ | grep -E '^(NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID|LISTEN_FDS|LISTEN_PID)=' || true")
[ -z "$leaked" ] || die "the postmaster (pid $pm) inherited: $leaked"
say "ok: the postmaster's environment has no NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*"

# A query whose cost passes jit_above_cost, on the embedded server, under the unit's
# hardening (its backends run in the service's sandbox).
jit=$(psql_embedded -c 'SHOW jit') || die "psql on the embedded server failed"
out=$(psql_embedded -c 'SET jit_above_cost = 0' -c 'SET jit_optimize_above_cost = 0' \
  -c 'SET jit_inline_above_cost = 0' \
  -c 'SELECT count(*) FROM generate_series(1, 300000) g WHERE g % 7 = 0' 2>&1) ||
  die "a query past jit_above_cost failed on the embedded server (jit=$jit): $out"
[ "$out" = 42857 ] || die "unexpected query result: $out"
say "ok: a query past jit_above_cost works (jit = $jit)"
phase "start, CLI, task, environment and JIT checks passed"

# --- reload ------------------------------------------------------------------------------
alert_ratio() { status_json | grep -o '"alert_ratio":[0-9.]*' | cut -d: -f2; }
reload() { T=60 cexec systemctl reload taskwarden; }
T=10 cexec cp "$CONFIG" /root/config.orig
pid0=$(unit MainPID)

# A valid change: a live key and two new agents (one reports whether it inherited
# systemd's variables, one sleeps until stopped).
cat >"$root/root/agents.toml" <<'TOML'

[agents.envprobe]
kind = "command"
command = ["sh", "-c", '''cat >/dev/null; printf '{"result": "%s|%s|%s"}\n' "${NOTIFY_SOCKET:-unset}" "${WATCHDOG_USEC:-unset}" "${WATCHDOG_PID:-unset}"''']

[agents.sleeper]
kind = "command"
command = ["sleep", "600"]
TOML
T=10 cexec sh -euc "sed -i 's/^pool_alert_ratio = .*/pool_alert_ratio = 0.85/' $CONFIG
cat /root/agents.toml >>$CONFIG"
T=10 cexec taskwarden check-config --config "$CONFIG" >/dev/null || die "the test's valid config is invalid"
reload || die "systemctl reload with a valid file exited $?"
[ "$(alert_ratio)" = 0.85 ] || die "reload exited 0 but pool_alert_ratio is $(alert_ratio), not 0.85"
say "ok: reload of a valid file exited 0 and the change is in force at once"
id=$(submit envprobe '{}')
wait_for 30 "task $id (agent envprobe, added by the reload) succeeded" task_has "$id" '"status":"succeeded"'
task_has "$id" '"result":"unset|unset|unset"' ||
  die "an agent inherited systemd's variables: $(task_field "$id" | grep -o '"result":"[^"]*"')"
say "ok: agents do not inherit NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID"
T=10 cexec cp "$CONFIG" /root/config.good

# An invalid value (clear ratio above alert ratio), then a file that is not TOML.
for breakage in "sed -i 's/^pool_alert_ratio = .*/pool_alert_ratio = 0.50/' $CONFIG" \
  "echo 'this is not toml' >>$CONFIG"; do
  T=10 cexec cp /root/config.good "$CONFIG"
  T=10 cexec sh -euc "$breakage"
  if reload; then die "systemctl reload exited 0 for an invalid file ($breakage)"; fi
  is_active || die "not active after a refused reload"
  [ "$(unit MainPID)" = "$pid0" ] || die "the main pid changed on a refused reload"
  [ "$(alert_ratio)" = 0.85 ] || die "a refused reload changed pool_alert_ratio to $(alert_ratio)"
  say "ok: reload of an invalid file ($breakage) exited non-zero; the running config is kept; in the journal:"
  T=15 cexec journalctl --no-pager -o cat -n 4 -u taskwarden | sed 's/^/    /' >&2
done
T=10 cexec cp /root/config.good "$CONFIG"
reload || die "reload of the restored file failed"
T=15 cexec systemctl status --no-pager taskwarden | head -n 8 >&2 || true
phase "reload checks passed"

# --- the watchdog ------------------------------------------------------------------------
wd=$(unit WatchdogUSec)
restarts0=$(unit NRestarts)
pid=$(unit MainPID)
T=10 cexec bash -c "kill -STOP $pid"
say "SIGSTOPped the main pid $pid (WatchdogSec=$wd); waiting for systemd's watchdog"
wd_s=$(span_s "$wd")
restarted() { [ "$(unit NRestarts)" -gt "$restarts0" ] && [ "$(unit MainPID)" != "$pid" ] && is_ready; }
wait_for $((wd_s + WATCHDOG_MARGIN)) "watchdog restarted the stopped daemon (NRestarts > $restarts0) and it is ready again" restarted
T=15 cexec journalctl --no-pager -o cat -u taskwarden --since=-120s |
  grep -iE 'watchdog|dumped|result|Started|stopping a PostgreSQL' | sed 's/^/    /' >&2 || true
phase "watchdog check passed"

# --- stop with a task running ------------------------------------------------------------
id=$(submit sleeper '{}')
wait_for 30 "task $id (agent sleeper) running" task_has "$id" '"status":"running"'
stop_timeout=$(span_s "$(unit TimeoutStopUSec)")
t0=$(date +%s)
T=$((stop_timeout + 15)) cexec systemctl stop taskwarden || die "systemctl stop failed"
took=$(($(date +%s) - t0))
[ "$(unit ActiveState)" = inactive ] || die "not inactive after stop: $(unit ActiveState)"
[ "$(unit Result)" = success ] || die "stop result: $(unit Result)"
[ "$(unit ExecMainStatus)" = 0 ] || die "exit status $(unit ExecMainStatus)"
[ "$took" -le "$stop_timeout" ] || die "stop took ${took}s, TimeoutStopSec is ${stop_timeout}s"
say "ok: stopped cleanly in ${took}s (exit 0)"
T=60 cexec runuser -u taskwarden -- /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/taskwarden/pgdata \
  -l /var/lib/taskwarden/check.log -w -t 30 -o '-k /var/lib/taskwarden/pgdata -c listen_addresses=' start >/dev/null
running=$(psql_embedded -c "SELECT count(*) FROM tasks WHERE status = 'running'")
sleeper=$(psql_embedded -c "SELECT status FROM tasks WHERE id = $id")
T=60 cexec runuser -u taskwarden -- /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/taskwarden/pgdata -m fast -w stop >/dev/null
[ "$running" = 0 ] || die "$running task(s) left running after stop"
say "ok: no task left running (the sleeper went back to: $sleeper)"
phase "stop checks passed"

# --- the journal -------------------------------------------------------------------------
journal=$(T=30 cexec journalctl -b --no-pager -o short-monotonic)
if printf '%s\n' "$journal" | grep -F 'reception only permitted'; then
  die "the journal has \"reception only permitted\" lines (a child notified systemd)"
fi
# The refused reloads are the only ERRORs expected.
errors=$(T=30 cexec journalctl -b --no-pager -u taskwarden | grep -E '\bERROR\b' |
  grep -v 'config reload failed' || true)
[ -z "$errors" ] || die "unexpected ERROR lines in the journal:
$errors"
say "ok: the journal has no child notifications and no unexpected ERROR"
# Each line reaches the journal at its level's priority (the daemon prefixes <N> when its
# stdout is the journal's stream): -p err finds the refused reloads' errors and no INFO
# or WARN line, -p warning no INFO line.
err_lines=$(T=30 cexec journalctl -b --no-pager -o cat -u taskwarden -p err || true)
printf '%s\n' "$err_lines" | grep -q 'config reload failed' ||
  die "journalctl -p err does not find the refused reloads' errors:
$err_lines"
if printf '%s\n' "$err_lines" | grep -E '\b(INFO|WARN)\b'; then
  die "journalctl -p err shows lines below error priority"
fi
if T=30 cexec journalctl -b --no-pager -o cat -u taskwarden -p warning | grep -E '\bINFO\b'; then
  die "journalctl -p warning shows INFO lines"
fi
say "ok: journalctl -p err and -p warning show exactly the errors and the warnings"
phase "all checks passed"
