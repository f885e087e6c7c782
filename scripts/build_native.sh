#!/usr/bin/env bash
# Build the native device (edge_client/native) against the executorch wheel in .venv and
# Debian's libmosquitto/zstd/OpenSSL/nlohmann-json: .cache/native/{libedgefl_device.so,edgefl-device};
# then the aggregator's native ingest worker (scripts/build_ingest.sh).
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ET=$("$PY" -c "import executorch, os; print(list(executorch.__path__)[0])")
BUILD=${EDGEFL_NATIVE_BUILD:-.cache/native}
mkdir -p "$(dirname "$BUILD")"
cmake -S edge_client/native -B "$BUILD" -DCMAKE_PREFIX_PATH="$ET/lib/cmake" \
      -DCMAKE_BUILD_TYPE=Release >"$BUILD.configure.log" 2>&1 \
    || { mkdir -p "$(dirname "$BUILD")"; cat "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" 2>&1 | grep -E "error|warning: unused|Error" >&2 || true
test -x "$BUILD/edgefl-device" || { echo "build_native: build failed (cmake --build $BUILD)" >&2; exit 1; }
echo "native device: $BUILD/edgefl-device"
bash scripts/build_ingest.sh
