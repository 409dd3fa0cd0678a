#!/usr/bin/env bash
# Installs webhook senders' own signing libraries from npm for the webhook tests (the Python ones, stripe,
# standardwebhooks and svix, are dev dependencies): @octokit/webhooks-methods, GitHub's. Idempotent.
set -euo pipefail
home=${EVENTSWARM_SERVICES_HOME:-/var/cache/eventswarm}/senders
mkdir -p "$home"
if [ ! -d "$home/node_modules/@octokit/webhooks-methods" ]; then
  if ! command -v npm >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "senders: installing @octokit/webhooks-methods with npm into $home"
  (cd "$home" && npm install --no-audit --no-fund --silent @octokit/webhooks-methods@6.0.0)
fi
echo "senders: @octokit/webhooks-methods $(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1])).version' "$home/node_modules/@octokit/webhooks-methods/package.json") in $home"
