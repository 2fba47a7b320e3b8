#!/usr/bin/env bash
# A throw-away PostgreSQL server for the key-store tests.
#   eval "$(bash scripts/pg-test-server.sh start)"   # prints export QKDSTACK_TEST_PG_URL=... (+ state dir)
#   bash scripts/pg-test-server.sh stop               # stops it and removes its data directory
# Installs Debian's `postgresql` package when no server binaries are found (needs root and apt).
# initdb refuses to run as root, so as root the cluster is owned by (and run as) the `postgres` user.
# Everything except the final export lines goes to stderr.
set -euo pipefail

STATE_FILE="${QKDSTACK_PG_STATE:-}"  # set by `start` (unique per server); `stop` reads it from the environment

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

as_db_user() {
  if [ "$(id -u)" = 0 ]; then
    if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local bindir
  if ! bindir=$(find_bindir); then
    echo "pg-test-server: no PostgreSQL server binaries; installing Debian package postgresql" >&2
    if [ "$(id -u)" != 0 ]; then echo "pg-test-server: need root to apt-get install postgresql" >&2; exit 1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bindir=$(find_bindir) || { echo "pg-test-server: postgresql installed but no binaries found" >&2; exit 1; }
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres >&2
  fi
  local dir port user
  dir=$(mktemp -d "${TMPDIR:-/tmp}/qkdstack-pg.XXXXXX")
  chmod 700 "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; user=postgres; else user=$(id -un); fi
  port=$(free_port)
  as_db_user "$bindir/initdb" -D "$dir/data" -U "$user" -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  as_db_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c max_connections=50" \
    start >&2 || { cat "$dir/server.log" >&2; exit 1; }
  as_db_user "$bindir/createdb" -h 127.0.0.1 -p "$port" -U "$user" qkdstack_test >&2
  [ -n "$STATE_FILE" ] || STATE_FILE="$dir.state"
  printf '%s\n%s\n%s\n' "$dir" "$bindir" "$port" >"$STATE_FILE"
  echo "export QKDSTACK_TEST_PG_URL=postgresql://$user@127.0.0.1:$port/qkdstack_test"
  echo "export QKDSTACK_PG_STATE=$STATE_FILE"
}

stop() {
  [ -n "$STATE_FILE" ] && [ -f "$STATE_FILE" ] || { echo "pg-test-server: not running (no $STATE_FILE)" >&2; return 0; }
  local dir bindir
  dir=$(sed -n 1p "$STATE_FILE"); bindir=$(sed -n 2p "$STATE_FILE")
  as_db_user "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  rm -rf "$dir" "$STATE_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
