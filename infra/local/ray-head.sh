#!/usr/bin/env bash
# Runs: a local Ray head (`ray start --head`) from ./.venv on 127.0.0.1 with token auth, the dashboard and
# Job Submission API on http://127.0.0.1:${DASHBOARD_PORT:-8265}, and ${NUM_CPUS:-all} CPUs. Jobs run with the
# venv's python and see this shell's AWS_* settings (start infra/local/s3-dev.sh and eval its exports first
# to use the dev S3 server). Then, from the repository root:
#   vitlabel submit --working-dir . -- run --input s3://dev/shards/ --output s3://dev/labels
#   vitlabel submit --working-dir . -- nightly --input s3://dev/shards/ --output s3://dev/labels --wave-shards 4
#   vitlabel submit list
# `infra/local/ray-head.sh stop` runs `ray stop`, which ends every Ray process of this user on this machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
if [ "${1:-}" = "stop" ]; then exec ray stop; fi
[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || ray get-auth-token --generate >/dev/null
ray start --head --node-ip-address 127.0.0.1 --port "${GCS_PORT:-6379}" --dashboard-host 127.0.0.1 \
  --dashboard-port "${DASHBOARD_PORT:-8265}" --include-dashboard=true ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} \
  --disable-usage-stats
echo "Ray head up: dashboard http://127.0.0.1:${DASHBOARD_PORT:-8265}; the token for submitting is read from" \
  "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (\`ray get-auth-token\` prints it)" >&2
