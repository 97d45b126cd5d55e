#!/usr/bin/env bash
# Builds and runs the taskwarden daemon with the shipped config.toml: with database.url
# empty it starts its own PostgreSQL under ./data. Extra arguments go to `taskwarden run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_postgres
cargo build --release --locked
exec ./target/release/taskwarden run --config config.toml "$@"
