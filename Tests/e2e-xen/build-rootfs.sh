#!/bin/bash
# Builds the dom0 root filesystem tree of Debian release $2 (bookworm: Xen 4.17, Linux 6.1;
# trixie: Xen 4.20, Linux 6.12) into $1, from Debian packages only (packages-$2.txt).
# Called by run.sh only when the cache key (this script + the package list) changed.
set -euo pipefail
dest=$1
release=$2
here=$(cd "$(dirname "$0")" && pwd)
mirror=${E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=$(grep -v '^#' "$here/packages-$release.txt" | paste -sd, -)
rm -rf "$dest.tmp"
debootstrap --variant=minbase --include="$include" "$release" "$dest.tmp" "$mirror"
chroot "$dest.tmp" apt-get clean
rm -rf "$dest"
mv "$dest.tmp" "$dest"
