#!/usr/bin/env bash
# The warm functions' runner (runner/eventswarm-runner.c): a static binary, built with Debian's
# musl-tools so that it needs nothing from the image it is injected into (no shell, no libc).
set -euo pipefail
cd "$(dirname "$0")/.."
out=dispatcher/executors/bin/eventswarm-runner
if ! command -v musl-gcc >/dev/null; then
  echo "runner: installing Debian's musl-tools"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
fi
mkdir -p "$(dirname "$out")"
musl-gcc -static -Os -s -Wall -Wextra -Werror -o "$out.tmp" runner/eventswarm-runner.c
mv "$out.tmp" "$out"
echo "runner: $out ($(stat -c %s "$out") bytes)"
