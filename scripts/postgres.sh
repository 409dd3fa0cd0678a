#!/usr/bin/env bash
# PostgreSQL for the shared state of several daemons (state = "postgresql://…"): Debian's postgresql,
# started as a plain process (no systemd) on 127.0.0.1:15432, trust authentication on loopback only,
# as the postgres user. Idempotent: a server already answering is left alone.
set -euo pipefail
port=${EVENTSWARM_PG_PORT:-15432}
home=${EVENTSWARM_SERVICES_HOME:-/var/cache/eventswarm}/postgres

. "$(dirname "$0")/lib.sh"

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  echo "postgres: installing Debian's postgresql"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if listening "$port"; then
  echo "postgres: a server answers on 127.0.0.1:$port"
  exit 0
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
install -d -o postgres -g postgres "$home" "$home/sock"
if [ ! -f "$home/data/PG_VERSION" ]; then
  rm -rf "$home/data"
  runuser -u postgres -- "$bin/initdb" -D "$home/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$home/initdb.log" 2>&1 \
    || { tail -20 "$home/initdb.log" >&2; exit 1; }
fi
echo "postgres: starting on 127.0.0.1:$port (log: $home/server.log)"
runuser -u postgres -- "$bin/pg_ctl" -D "$home/data" -l "$home/server.log" -w -t 60 \
  -o "-p $port -k $home/sock -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
  || { tail -20 "$home/server.log" >&2; exit 1; }
echo "postgres: ready on 127.0.0.1:$port"
