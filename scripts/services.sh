#!/usr/bin/env bash
# Installs and starts what the integration tests need, when it is missing: a Docker engine
# (Debian's docker.io, no default bridge) that is a single-node Swarm manager, and the
# static busybox the test function images are built from. Idempotent: a running engine is
# left alone.
set -euo pipefail

log=${EVENTSWARM_SERVICES_LOG:-/tmp/eventswarm-dockerd.log}

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "services: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "services: starting dockerd (log: $log)"
  setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$log" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "services: dockerd did not start; see $log" >&2; tail -20 "$log" >&2; exit 1; }
fi

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  echo "services: docker swarm init"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
fi
echo "services: docker engine $(docker version --format '{{.Server.Version}}') ready, swarm active"
