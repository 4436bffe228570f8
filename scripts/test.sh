#!/usr/bin/env bash
# Run the test suite from a fresh clone: make .venv, install torch 2.13.0 (the CPU wheel on this machine
# type) first and then the project with its dev, train, eval, serve and ray extras, install Debian's chromium (report
# screenshots) and postgresql when missing and we are root, start a throwaway PostgreSQL server on loopback
# so the store tests run on both SQLite and PostgreSQL, then run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,train,eval,serve,ray]"

if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium and chromedriver for the report screenshot test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
    >/dev/null 2>&1 || echo "could not install chromium; the screenshot test will skip" >&2
fi

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$pg_bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's postgresql for the store tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 || true
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
pg_dir=""
cleanup() { if [ -n "$pg_dir" ]; then as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; fi; }
trap cleanup EXIT
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ -n "$pg_bin" ] && { [ "$(id -u)" != 0 ] || id postgres >/dev/null 2>&1; }; then
  pg_dir=$(mktemp -d /tmp/outreach-pg.XXXXXX)
  chmod 777 "$pg_dir"
  port=$((20000 + RANDOM % 20000))
  if as_pg "$pg_bin/initdb" -D "$pg_dir/data" -U outreach --auth=trust >/dev/null \
     && as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -w -l "$pg_dir/log" \
          -o "-c listen_addresses=127.0.0.1 -p $port -k $pg_dir -c fsync=off" start >/dev/null; then
    export OUTREACH_TEST_POSTGRES_URL="postgresql+psycopg://outreach@127.0.0.1:$port/postgres"
    echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port for the store tests"
  else
    echo "could not start PostgreSQL; store tests run on SQLite only" >&2
  fi
fi

.venv/bin/python -m pytest "$@"
