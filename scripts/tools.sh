#!/usr/bin/env bash
# Installs the Debian tools some tests drive as real peers: stunnel4 (a TLS front before a tansu broker of the
# Kafka TLS tests, with a CA the test makes), logrotate (it rotates a file that lines mode is reading) and
# mosquitto (the MQTT broker the MQTT tests start, each its own).
# Idempotent.
set -euo pipefail
missing=()
command -v stunnel4 >/dev/null || missing+=(stunnel4)
command -v logrotate >/dev/null || [ -x /usr/sbin/logrotate ] || missing+=(logrotate)
command -v openssl >/dev/null || missing+=(openssl)
[ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tools: installing Debian's ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "tools: $(stunnel4 -version 2>&1 | grep -m1 '^stunnel '); $(/usr/sbin/logrotate --version 2>&1 | head -1);" \
  "$(/usr/sbin/mosquitto -h 2>&1 | head -1)"
