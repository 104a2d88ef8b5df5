#!/bin/bash
# Builds the dom0 root filesystem tree (debootstrap, Debian 12 packages only) into $1.
# Called by run.sh only when the cache key (this script + packages.txt) changed.
set -euo pipefail
dest=$1
here=$(cd "$(dirname "$0")" && pwd)
mirror=${E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=$(grep -v '^#' "$here/packages.txt" | paste -sd, -)
rm -rf "$dest.tmp"
debootstrap --variant=minbase --include="$include" bookworm "$dest.tmp" "$mirror"
chroot "$dest.tmp" apt-get clean
rm -rf "$dest"
mv "$dest.tmp" "$dest"
