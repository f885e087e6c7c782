#!/usr/bin/env bash
# Set up everything, then run the whole test suite. Fails on any failure, and on "no tests".
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh  # the status page's browser test renders it headless
bash scripts/build_native.sh  # the native C++ device (edge_client/native), for its tests
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
