#!/usr/bin/env bash
# A headless browser for the status page's tests: Debian's chromium (driven by the pip playwright
# package, pointed at /usr/bin/chromium: `playwright install` would download one, which fails offline).
set -euo pipefail
if ! command -v chromium >/dev/null; then
  echo "browser: installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
echo "browser: $(chromium --version 2>/dev/null | head -1)"
