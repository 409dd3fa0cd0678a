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
# (docker's notice that its legacy builder is deprecated is said only when a build fails: buildx is not needed)
build() {
  local out
  out=$(docker build -q -t "$1" "$2" 2>&1 >/dev/null) || { echo "$out" >&2; echo "images: cannot build $1" >&2; exit 1; }
}
build eventswarm/busybox:test "$ctx"
for dir in "$here"/tests/images/*/; do
  name=$(basename "$dir")
  build "eventswarm/$name:test" "$dir"
  echo "images: eventswarm/$name:test"
done
