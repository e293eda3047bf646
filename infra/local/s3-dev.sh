#!/usr/bin/env bash
# Runs: a development S3 server (moto, in-memory) on 127.0.0.1:${S3_PORT:-9000} with a bucket ${BUCKET:-dev},
# in the foreground until Ctrl-C. Point vitlabel (and a local Ray head started after it) at it with the
# exports it prints, e.g. in another shell:
#   eval "$(infra/local/s3-dev.sh --print-env)"
#   vitlabel run --input s3://dev/shards/ --output s3://dev/labels
# Data lives in memory: stopping the server forgets every object.
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${S3_PORT:-9000}
BUCKET=${BUCKET:-dev}
ENDPOINT="http://127.0.0.1:${PORT}"
print_env() {
  echo "export AWS_ENDPOINT_URL=${ENDPOINT}"
  echo "export AWS_ACCESS_KEY_ID=dev-key-id AWS_SECRET_ACCESS_KEY=dev-secret-key"
  echo "export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1"
}
if [ "${1:-}" = "--print-env" ]; then print_env; exit 0; fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m moto.server -H 127.0.0.1 -p "$PORT" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 50); do
  "$PY" - "$ENDPOINT" <<'PY' 2>/dev/null && break
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
  sleep 0.2
done
AWS_ACCESS_KEY_ID=dev-key-id AWS_SECRET_ACCESS_KEY=dev-secret-key AWS_DEFAULT_REGION=us-east-1 \
  "$PY" -c "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])" \
  "$ENDPOINT" "$BUCKET"
echo "dev S3 at ${ENDPOINT}, bucket s3://${BUCKET}/ ready; use:" >&2
print_env >&2
wait "$SERVER"
