#!/usr/bin/env bash
# Reproduces docs/tracing_phoenix.png: one Baton request (real router + Ray prefill/decode pools,
# default model, CPU) traced into Phoenix, its trace page captured by headless Chromium.
# Needs: `make install`, Debian chromium (apt-get install -y chromium), and Phoenix on :6006
# (started here with `make tracing` if nothing answers there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/tracing_phoenix.png}
PHX=http://localhost:6006
started=""
if ! curl -sf -o /dev/null "$PHX/"; then
  setsid make tracing > /tmp/baton-phoenix.log 2>&1 &
  started=$!
  for _ in $(seq 1 180); do curl -sf -o /dev/null "$PHX/" && break; sleep 1; done
fi
OTEL_EXPORTER_OTLP_ENDPOINT=$PHX .venv/bin/python docs/tracing_demo.py
# the newest trace with a `request` span (Phoenix's GraphQL API; project "default")
TRACE=$(curl -sf "$PHX/graphql" -H 'content-type: application/json' -d \
  '{"query":"{ node(id: \"UHJvamVjdDox\") { ... on Project { spans(first: 1, sort: {col: startTime, dir: desc}, filterCondition: \"name == '"'"'request'"'"'\") { edges { node { context { traceId } } } } } } }"}' \
  | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["data"]["node"]["spans"]["edges"][0]["node"]["context"]["traceId"])')
echo "trace $TRACE"
PROFILE=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$PROFILE" --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=15000 --screenshot="$OUT" "$PHX/projects/UHJvamVjdDox/traces/$TRACE"
rm -rf "$PROFILE"
[ -n "$started" ] && kill -- -"$started" 2>/dev/null || true
echo "wrote $OUT"
