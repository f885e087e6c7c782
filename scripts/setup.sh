#!/usr/bin/env bash
# One-time (idempotent) set-up on a Debian machine: apt packages, a Python 3.11 venv, pinned deps.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."

# fortunes-de/es/it/pl: the language-identification task of the multi-task text federations.
# cmake, g++, pkg-config and the -dev packages: the native C++ device (scripts/build_native.sh)
# and the native ingest worker (scripts/build_ingest.sh, which also needs libsqlite3-dev).
APT_PACKAGES=(mosquitto dataset-fashion-mnist fortunes fortunes-de fortunes-es fortunes-it fortunes-pl
              cmake g++ pkg-config libmosquitto-dev libzstd-dev libssl-dev nlohmann-json3-dev
              libsqlite3-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q "${missing[@]}" >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

# onnxruntime-training 1.19.2 (the last release) ships wheels for Python <= 3.11.
PYTHON=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        PYTHON="$candidate"; break
    fi
done
[ -n "$PYTHON" ] || { echo "setup: Python 3.11 is required (apt-get install python3.11-venv)" >&2; exit 1; }

# Reinstall only when the pinned dependencies change.
stamp=".venv/.edgefl-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: creating .venv and installing pinned dependencies (first run: a few minutes)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[device,test]"
    rm -f .venv/.edgefl-deps-*
    touch "$stamp"
fi
