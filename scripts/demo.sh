#!/usr/bin/env bash
# Set up everything, then run the demo federation (extra arguments go to `edgefl demo`).
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgefl demo "$@"
