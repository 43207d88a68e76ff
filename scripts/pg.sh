#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL under .data/pg and prints its URL.
# Runs the server as the `postgres` user when invoked as root (initdb refuses
# root). Usage: scripts/pg.sh [start|stop|url]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
data="$root/.data/pg"
cmd=${1:-start}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

bin() {
  # Prefer binaries on PATH; fall back to Debian's versioned directory.
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return; fi
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  echo "scripts/pg.sh: $1 not found (install the PostgreSQL server, e.g. apt-get install postgresql)" >&2
  exit 1
}

url() { echo "postgresql://postgres@127.0.0.1:$(cat "$data/port")/postgres?sslmode=disable"; }

running() { [ -f "$data/PG_VERSION" ] && as_pg "$(bin pg_ctl)" -D "$data" status >/dev/null 2>&1; }

case "$cmd" in
url) url; exit 0 ;;
stop) running && as_pg "$(bin pg_ctl)" -D "$data" -m fast stop >/dev/null; exit 0 ;;
start) ;;
*) echo "usage: $0 [start|stop|url]" >&2; exit 2 ;;
esac

if running; then url; exit 0; fi

mkdir -p "$root/.data"
if [ ! -f "$data/PG_VERSION" ]; then
  rm -rf "$data"; mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$data"
  as_pg "$(bin initdb)" -D "$data" -U postgres -A trust -E UTF8 >"$root/.data/initdb.log" 2>&1 \
    || { cat "$root/.data/initdb.log" >&2; exit 1; }
fi

# A free port: the first of 55432.. that nothing listens on.
port=55432
while (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do port=$((port + 1)); done
echo "$port" >"$data/port"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$data/port"

# Tuned for a throwaway test/dev server: durability off, enough connections
# for parallel test packages each running API, workers and listeners.
as_pg "$(bin pg_ctl)" -D "$data" -l "$data/server.log" -w -t 60 start -o \
  "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=500 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB" >/dev/null \
  || { tail -20 "$data/server.log" >&2; exit 1; }
url
