#!/usr/bin/env bash
# Installs Debian's stunnel4 for the Kafka TLS tests: they put a TLS front (with a CA of the test's own) before a
# tansu broker of their own, tansu's own TLS not being usable here. Idempotent.
set -euo pipefail
if ! command -v stunnel4 >/dev/null && ! command -v stunnel >/dev/null; then
  echo "stunnel: installing Debian's stunnel4"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 openssl >/dev/null
fi
echo "stunnel: $(stunnel4 -version 2>&1 | grep -m1 "^stunnel ")"
