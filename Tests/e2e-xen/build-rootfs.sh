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
# Guests get their console logged to a file, which dom0 copies to the serial console.
echo 'XENCONSOLED_TRACE=guest' >> "$dest.tmp/etc/default/xencommons"
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> "$dest.tmp/etc/default/xencommons"
chroot "$dest.tmp" apt-get clean
rm -rf "$dest"
mv "$dest.tmp" "$dest"
