#!/usr/bin/env bash
# Builds a local Debian base image with Python (there is no registry to pull python:3.12-slim
# from): a minimal rootfs made with debootstrap from the machine's own Debian mirror, imported
# with `docker import` as eventswarm/base:local. Skipped when that image exists.
set -euo pipefail
tag=${1:-eventswarm/base:local}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag exists"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
# The mirror and suite this machine's apt already uses.
sources=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
mirror=$(printf '%s\n' "$sources" | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit} /^deb / && $2 !~ /security/ {print $2; exit}')
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
[ -n "$mirror" ] || { echo "base-image: no Debian mirror found in /etc/apt" >&2; exit 1; }
root=$(mktemp -d /tmp/eventswarm-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap $suite into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" >/tmp/eventswarm-debootstrap.log 2>&1 \
  || { tail -20 /tmp/eventswarm-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "base-image: $tag built"
