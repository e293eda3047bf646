#!/usr/bin/env bash
# Runs: `vitlabel demo` (the embedded default: local Ray, local files, bundled model) after setting up ./.venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0
vitlabel demo "$@"
