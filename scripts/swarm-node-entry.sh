#!/bin/sh
# A Swarm node: /sys and the cgroup hierarchies writable (the engine makes cgroups for its containers), no
# name server (nothing is ever looked up), then dockerd under tini (it reaps what dockerd leaves).
set -e
mount -o remount,rw /sys
for dir in /sys/fs/cgroup /sys/fs/cgroup/*; do
  # (a cgroup v1 hierarchy refuses a plain remount, "busy": a bind remount changes only this mount point)
  mountpoint -q "$dir" && { mount -o remount,rw "$dir" 2>/dev/null || mount -o remount,bind,rw "$dir"; }
done
echo "nameserver 127.0.0.1" >/etc/resolv.conf
export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1
# (TLS applies to every TCP listener of a dockerd: the engine is reached with a client certificate only)
exec tini -- dockerd -H unix:///var/run/docker.sock -H tcp://0.0.0.0:2376 \
  --tlsverify --tlscacert /certs/ca.pem --tlscert /certs/server-cert.pem --tlskey /certs/server-key.pem \
  --bip 10.214.0.1/24 --default-address-pool base=10.215.0.0/16,size=24 --storage-driver overlay2 "$@"
