#!/usr/bin/env bash
# Runs: the whole test suite (real moto S3 server, real local Ray, real `ray start --head` cluster)
# after setting up ./.venv. Extra arguments go to pytest, e.g. `infra/local/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0
python -m pytest -q "$@"
