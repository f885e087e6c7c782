#!/usr/bin/env bash
# Idempotent: install Debian's headless-capable Chromium, used by the status page's browser test.
set -o errexit -o pipefail -o nounset

dpkg -s chromium >/dev/null 2>&1 && exit 0
echo "setup: installing Debian package: chromium"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be stale or absent on a fresh image: update once, then retry.
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null \
    || { $SUDO apt-get update -q >/dev/null \
         && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }
