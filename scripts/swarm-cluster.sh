#!/usr/bin/env bash
# A three-node Docker Swarm on this machine, for the multi-node tests (docs/swarm.md): three dockerds in
# containers of the host engine (docker-in-docker), a manager and two workers, on a bridge network of their own
# with a fixed subnet. Each nested engine listens on tcp://NODE:2376 with mutual TLS, as a remote engine should
# (the CA and a client certificate are made here, in $CERTS: ca.pem, cert.pem, key.pem, as Docker's own client
# takes them with DOCKER_CERT_PATH). The test images are loaded into every node (there is no registry: nothing is
# ever pulled).
#
#   bash scripts/swarm-cluster.sh        start it (idempotent: a running cluster is left alone); prints the
#                                        manager's address
#   bash scripts/swarm-cluster.sh down   remove everything it made: nodes, their volumes, the network
#
# The node image is built once from Debian's packages (debootstrap, ~45 s) and kept by the host engine; a run
# that finds it starts the nodes in seconds.
set -euo pipefail

PREFIX=eventswarm-node
NETWORK=eventswarm-cluster
SUBNET=10.213.7.0/24
IPS=(10.213.7.10 10.213.7.11 10.213.7.12)
LABEL=io.eventswarm.cluster=true
IMAGE_TAG=1
IMAGE=eventswarm/swarm-node:$IMAGE_TAG
CERTS=${EVENTSWARM_CLUSTER_CERTS:-/var/cache/eventswarm/cluster-certs}
MIRROR=${EVENTSWARM_DEBIAN_MIRROR:-}
here=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "swarm-cluster: $*"; }
node_api() {
  docker -H "tcp://${IPS[$1]}:2376" --tlsverify --tlscacert "$CERTS/ca.pem" --tlscert "$CERTS/cert.pem" \
    --tlskey "$CERTS/key.pem" "${@:2}"
}

down() {
  local ids
  ids=$(docker ps -aq --filter "label=$LABEL")
  [ -n "$ids" ] && docker rm -f -v $ids >/dev/null
  ids=$(docker volume ls -q --filter "label=$LABEL")
  [ -n "$ids" ] && docker volume rm $ids >/dev/null
  docker network inspect "$NETWORK" >/dev/null 2>&1 && docker network rm "$NETWORK" >/dev/null
  say "removed"
}

debian_mirror() {
  # The mirror apt already uses (deb822 sources or a sources.list line).
  [ -n "$MIRROR" ] && { echo "$MIRROR"; return; }
  local found
  found=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -z "$found" ] && found=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{print $2}' | grep -v security | head -1 || true)
  echo "${found:-http://deb.debian.org/debian}"
}

build_image() {
  docker image inspect "$IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  local root
  root=$(mktemp -d /var/tmp/eventswarm-node.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  say "building the node image $IMAGE from Debian packages (about a minute, once)"
  debootstrap --variant=minbase --include=docker.io,iproute2,ca-certificates,procps,tini \
    bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; say "debootstrap failed" >&2; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
  tar -C "$root" -c . | docker import \
    -c 'ENTRYPOINT ["/usr/local/bin/node-entry"]' -c "LABEL $LABEL" -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$IMAGE" >/dev/null
  say "node image $IMAGE ready"
}

make_certs() {
  # A CA, a server certificate for the three nodes' addresses, a client certificate (mutual TLS).
  [ -f "$CERTS/server-cert.pem" ] && return 0
  mkdir -p "$CERTS"
  local t
  t=$(mktemp -d)
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=eventswarm-cluster-ca \
    -keyout "$CERTS/ca-key.pem" -out "$CERTS/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=eventswarm-node -keyout "$CERTS/server-key.pem" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:%s,IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "${IPS[@]}" >"$t/server.ext"
  openssl x509 -req -in "$t/server.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" -CAcreateserial -days 3650 \
    -extfile "$t/server.ext" -out "$CERTS/server-cert.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=eventswarm-client -keyout "$CERTS/key.pem" -out "$t/client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$t/client.ext"
  openssl x509 -req -in "$t/client.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" -CAcreateserial -days 3650 \
    -extfile "$t/client.ext" -out "$CERTS/cert.pem" 2>/dev/null
  chmod 0644 "$CERTS"/*.pem
  rm -rf "$t"
}

start_node() {
  local i=$1 name="$PREFIX-$(($1 + 1))"
  if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; then return 0; fi
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker volume create --label "$LABEL" "$name-docker" >/dev/null
  # (--privileged is refused here: this host's capability bounding set lacks CAP_SYS_RESOURCE)
  docker create --name "$name" --hostname "$name" --label "$LABEL" \
    --network "$NETWORK" --ip "${IPS[$i]}" \
    --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --security-opt systempaths=unconfined --device-cgroup-rule 'a *:* rwm' --tmpfs /run --tmpfs /tmp \
    -v "$name-docker:/var/lib/docker" -v "$CERTS:/certs:ro" \
    -v "$SHARED:$SHARED:rw" \
    "$IMAGE" >/dev/null
  # (the entry script is copied in, not baked into the image: changing it needs no new image)
  docker cp "$here/scripts/swarm-node-entry.sh" "$name:/usr/local/bin/node-entry"
  docker start "$name" >/dev/null
}

wait_engine() {
  local i=$1
  for _ in $(seq 1 150); do
    node_api "$i" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  say "the engine of $PREFIX-$(($i + 1)) did not answer; its log:" >&2
  docker logs --tail 20 "$PREFIX-$(($i + 1))" >&2
  exit 1
}

load_images() {
  # The test images, into every node that lacks them (docker save | docker load: no registry).
  local images=() image i
  mapfile -t images < <(docker images --format '{{.Repository}}:{{.Tag}}' | grep '^eventswarm/' | grep -v '^eventswarm/swarm-node:' | sort)
  for i in 0 1 2; do
    local missing=()
    for image in "${images[@]}"; do
      node_api "$i" image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
    done
    [ ${#missing[@]} -gt 0 ] && docker save "${missing[@]}" | node_api "$i" load -q >/dev/null
  done
  return 0
}

form_swarm() {
  if [ "$(node_api 0 info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
    node_api 0 swarm init --advertise-addr "${IPS[0]}" >/dev/null
  fi
  local token i
  token=$(node_api 0 swarm join-token -q worker)
  for i in 1 2; do
    if [ "$(node_api "$i" info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
      node_api "$i" swarm join --token "$token" "${IPS[0]}:2377" >/dev/null
    fi
  done
  # Every node Ready before the tests place anything.
  for _ in $(seq 1 100); do
    [ "$(node_api 0 node ls --format '{{.Status}}' | grep -c Ready)" = 3 ] && return 0
    sleep 0.2
  done
  say "the nodes did not all become Ready:" >&2
  node_api 0 node ls >&2
  exit 1
}

SHARED=${EVENTSWARM_CLUSTER_SHARED:-/var/tmp/eventswarm-cluster-shared}

case "${1:-up}" in
  down) down; exit 0 ;;
  up) ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac

docker info >/dev/null 2>&1 || { say "no Docker engine (bash scripts/services.sh starts one)" >&2; exit 1; }
build_image
make_certs
mkdir -p "$SHARED"
chmod 0777 "$SHARED"
docker network inspect "$NETWORK" >/dev/null 2>&1 \
  || docker network create --driver bridge --subnet "$SUBNET" --label "$LABEL" "$NETWORK" >/dev/null
for i in 0 1 2; do start_node "$i"; done
for i in 0 1 2; do wait_engine "$i"; done
load_images
form_swarm
say "3 nodes ready; manager tcp://${IPS[0]}:2376 (TLS: DOCKER_CERT_PATH=$CERTS); shared folder $SHARED"
