#!/usr/bin/env bash
# Builds the daemon's image from the Dockerfile on the local Debian base (scripts/base-image.sh).
# The wheels are built here, with this machine's pip and its trust settings, and go into the
# build context as wheelhouse/: the image build itself needs no network.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-eventswarm:test}
python=${PYTHON:-python3}
bash "$here/scripts/base-image.sh" eventswarm/base:local
ctx=$(mktemp -d /tmp/eventswarm-build.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp -r "$here/Dockerfile" "$here/.dockerignore" "$here/pyproject.toml" "$here/README.md" "$here/dispatcher" "$here/connectors" "$ctx/"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m pip wheel -q --wheel-dir "$ctx/wheelhouse" "$ctx" >/dev/null
docker build -q --build-arg BASE=eventswarm/base:local -t "$tag" "$ctx" >/dev/null
echo "daemon-image: $tag built"
