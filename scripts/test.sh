#!/usr/bin/env bash
# The test command behind `make test`: lint, then the whole suite.
# Starts a throw-away PostgreSQL server for the key-store tests (installing Debian's
# postgresql package first where the machine lacks it) unless QKDSTACK_TEST_PG_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
"$VENV/bin/ruff" check src tests benchmarks
# The OpenPGP web-of-trust tests need GnuPG (Debian package gnupg); install it where it is missing and we are root.
if ! command -v gpg >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnupg >&2
fi
# The dashboard test renders the page in a real headless browser (Debian package chromium, driven by Playwright's
# Python package with the system browser); install it where it is missing and we are root.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
# The PSK-consumer and SKIP tests drive Debian's TLS tools (openssl s_server/s_client, GnuTLS gnutls-serv/-cli);
# install them where they are missing and we are root.
if { ! command -v openssl >/dev/null 2>&1 || ! command -v gnutls-serv >/dev/null 2>&1; } && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl gnutls-bin >&2
fi
if [ -z "${QKDSTACK_TEST_PG_URL:-}" ] && [ -x scripts/pg-test-server.sh ]; then
  eval "$(bash scripts/pg-test-server.sh start)"
  trap 'bash scripts/pg-test-server.sh stop >/dev/null 2>&1 || true' EXIT
fi
"$VENV/bin/python" -m pytest -q "$@"
