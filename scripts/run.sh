#!/usr/bin/env bash
# `make run`: a whole local fleet in the foreground. Starts a throwaway
# Postgres under .data/ unless ORCH_DATABASE_URL is set, writes development
# secrets to .env when absent, builds the engine image when Docker answers
# (otherwise uses the subprocess backend), migrates, and runs every role.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.build/orchestrator

if [ -z "${ORCH_DATABASE_URL:-}" ]; then
  base=$(scripts/pg.sh)
  psql "$base" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'orchestrator'" | grep -q 1 \
    || psql "$base" -qc "CREATE DATABASE orchestrator" >/dev/null
  export ORCH_DATABASE_URL="${base/\/postgres\?/\/orchestrator?}"
  # For the CLI beside this fleet: set -a; . ./.env; . .data/run.env; set +a
  echo "ORCH_DATABASE_URL='$ORCH_DATABASE_URL'" >.data/run.env
fi

if [ ! -f .env ]; then
  {
    echo "# Development secrets written by make run on $(date -u +%FT%TZ). Never commit this file."
    $bin keys generate
  } >.env
  chmod 600 .env
  echo "wrote development secrets to .env"
fi
set -a
# shellcheck disable=SC1091
. ./.env
set +a

export ORCH_LOG_FORMAT=${ORCH_LOG_FORMAT:-text}
version=$($bin version)
if [ -z "${ORCH_ENGINE_BACKEND:-}" ]; then
  if docker info >/dev/null 2>&1; then
    export ORCH_ENGINE_BACKEND=docker
  else
    export ORCH_ENGINE_BACKEND=subprocess
    echo "no Docker daemon answers: using the subprocess backend (engines run as local processes under .data/engines)"
  fi
fi
if [ "$ORCH_ENGINE_BACKEND" = docker ] && [ -z "${ORCH_ENGINE_IMAGE:-}" ]; then
  make --no-print-directory engine-image VERSION="$version" >/dev/null
  export ORCH_ENGINE_IMAGE="enginefleet/engine:$version"
  echo "engine image: $ORCH_ENGINE_IMAGE"
fi
if [ "$ORCH_ENGINE_BACKEND" = subprocess ]; then
  export ORCH_ENGINE_BINARY=${ORCH_ENGINE_BINARY:-$(pwd)/.build/engine}
  export ORCH_ENGINE_IMAGE=${ORCH_ENGINE_IMAGE:-enginefleet/engine:$version}
fi

$bin migrate up
addr=${ORCH_LISTEN_ADDR:-:8000}
cat <<MSG

orchestrator $version: all roles, backend $ORCH_ENGINE_BACKEND, API on $addr
admin key: $ORCH_ADMIN_KEY

first steps:
  curl -s -XPOST localhost:${addr##*:}/products/register -H "X-Admin-Key: $ORCH_ADMIN_KEY" -H 'Content-Type: application/json' \\
       -d '{"slug":"demo","display_name":"Demo"}'
  curl -s -XPOST localhost:${addr##*:}/engines/alice/admit -H "X-Platform-Key: <platform_api_key from above>" \\
       -H 'Content-Type: application/json' -d '{"auto_provision":true}'

the CLI on this fleet (backups, audit verify, keys):
  set -a; . ./.env; . .data/run.env; set +a; $bin help

MSG
exec $bin serve --roles=api,worker,scheduler
