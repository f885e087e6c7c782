#!/usr/bin/env bash
# Build the aggregator's native ingest worker (aggregator/native) from Debian's zstd, SQLite,
# OpenSSL and nlohmann-json (no ExecuTorch): .cache/native-ingest/edgefl-ingest, which
# `edgefl aggregator --workers N --worker-kind native` starts. build_native.sh runs this too.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
BUILD=${EDGEFL_INGEST_BUILD:-.cache/native-ingest}
mkdir -p "$(dirname "$BUILD")"
cmake -S aggregator/native -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >"$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" 2>&1 | grep -E "error|warning: unused|Error" >&2 || true
test -x "$BUILD/edgefl-ingest" || { echo "build_ingest: build failed (cmake --build $BUILD)" >&2; exit 1; }
echo "native ingest worker: $BUILD/edgefl-ingest"
