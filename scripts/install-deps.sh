#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, and any named as arguments
# (scripts/ceph-test.sh adds Ceph's daemons); does nothing when they are there.
#   scripts/install-deps.sh [PACKAGE...]
set -euo pipefail
packages=(pkg-config libxen-dev libmicrohttpd-dev libjansson-dev liburing-dev libnbd-dev librbd-dev nbdkit xenstore-utils fio
          curl openssl python3 python3-venv "$@")
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
