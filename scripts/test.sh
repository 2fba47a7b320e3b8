#!/usr/bin/env bash
# The test command behind `make test`: lint, then the whole suite.
# Starts a throw-away PostgreSQL server for the key-store tests (installing Debian's
# postgresql package first where the machine lacks it) unless QKDSTACK_TEST_PG_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
"$VENV/bin/ruff" check src tests benchmarks
if [ -z "${QKDSTACK_TEST_PG_URL:-}" ] && [ -x scripts/pg-test-server.sh ]; then
  eval "$(bash scripts/pg-test-server.sh start)"
  trap 'bash scripts/pg-test-server.sh stop >/dev/null 2>&1 || true' EXIT
fi
"$VENV/bin/python" -m pytest -q "$@"
