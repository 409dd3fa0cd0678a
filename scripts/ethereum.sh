#!/usr/bin/env bash
# Installs an Ethereum node (anvil, from Foundry's npm package) and the Solidity compiler (solcjs) for
# the tests, and starts a shared anvil on 127.0.0.1:18545 (tests that change the chain, such as
# reorgs, start their own on a free port). Idempotent: a node already answering is left alone.
set -euo pipefail
port=${EVENTSWARM_ETH_PORT:-18545}
home=${EVENTSWARM_SERVICES_HOME:-/var/cache/eventswarm}/eth
log="$home/anvil.log"

. "$(dirname "$0")/lib.sh"

mkdir -p "$home"
if [ ! -x "$home/node_modules/.bin/anvil" ] || [ ! -x "$home/node_modules/.bin/solcjs" ]; then
  if ! command -v npm >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "ethereum: installing anvil and solc with npm into $home"
  (cd "$home" && npm install --no-audit --no-fund --silent @foundry-rs/anvil-linux-amd64@1.7.1 solc@0.8.28)
fi
if listening "$port"; then
  echo "ethereum: a node answers on 127.0.0.1:$port"
  exit 0
fi
start_service ethereum "$port" "$log" "$home/node_modules/.bin/anvil" --host 127.0.0.1 --port "$port"
