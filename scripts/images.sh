#!/usr/bin/env bash
# Builds the local function images used by the example config, the tests and the benchmarks,
# from scratch with the static busybox (there is no registry to pull from).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp /bin/busybox "$ctx/busybox"
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
DOCKERFILE
docker build -q -t eventswarm/busybox:test "$ctx" >/dev/null
for dir in "$here"/tests/images/*/; do
  name=$(basename "$dir")
  docker build -q -t "eventswarm/$name:test" "$dir" >/dev/null
  echo "images: eventswarm/$name:test"
done
