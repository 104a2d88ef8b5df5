#!/usr/bin/env bash
# Opt-in container test (make container-test, or BLKBACK_CONTAINER_TEST=1 scripts/test.sh):
# builds the runtime image of docker/Dockerfile.runtime from host-built static-stdlib
# binaries with podman, offline, on a local debootstrap base image (made once, then cached),
# and runs the simulator demo in it: xensim + blkback-server + a verified guest for a few
# seconds, exit 0. Then checks that the dom0 entrypoint without /dev/xen fails with exit 2.
#
# Environment: CONTAINER_TEST_SECONDS (default 5), BLKBACK_STATIC_BIN_DIR (skip the host build).
# Installs podman, runc and debootstrap with apt (root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
seconds="${CONTAINER_TEST_SECONDS:-5}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
# The tag names what the base holds: a new runtime package needs a new tag.
base=localhost/blkback-base:bookworm-rbd
image=localhost/blkback:test
runtime_packages="libstdc++6 libxenstore4 libxengnttab1 libxenevtchn1 libmicrohttpd12 libjansson4 liburing2 libnbd0 librbd1 xenstore-utils"
say() { echo "container-test: $*"; }

missing=()
for package in podman runc debootstrap; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
scripts/install-deps.sh
# crun fails on this kind of host (cgroups in hybrid mode); runc works.
podman() { $sudo command podman --runtime runc "$@"; }

if [ -n "${BLKBACK_STATIC_BIN_DIR:-}" ]; then
    bin="$BLKBACK_STATIC_BIN_DIR"
else
    say "building static-stdlib release binaries on the host"
    swift build -c release -Xswiftc -static-stdlib
    bin="$(swift build -c release -Xswiftc -static-stdlib --show-bin-path)"
fi

# No registry here: the base is a debootstrap tree that already holds the runtime packages,
# so the image builds with --network=none (Dockerfile.runtime skips apt when they are there).
if ! podman image exists "$base"; then
    say "making the base image $base with debootstrap (once; it is cached)"
    root="$(mktemp -d)"
    $sudo debootstrap --variant=minbase --include="${runtime_packages// /,}" bookworm "$root" http://deb.debian.org/debian >/dev/null
    $sudo rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    $sudo tar -C "$root" -c . | podman import - "$base" >/dev/null
    $sudo rm -rf "$root"
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$bin/blkback-server" "$bin/xensim" scripts/demo.sh "$context/"
strip "$context/blkback-server" "$context/xensim"
say "building $image"
podman build --network=none --build-arg BASE="$base" -f docker/Dockerfile.runtime -t "$image" "$context" >/dev/null

limits=(--ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
say "running the demo in the container for $seconds s"
# The default seccomp profile answers io_uring_setup with ENOSYS; the data plane needs it.
podman run --rm --network=none "${limits[@]}" --security-opt seccomp=unconfined --tmpfs /tmp \
    --entrypoint /usr/local/bin/blkback-demo "$image" --check "$seconds"

say "checking the dom0 entrypoint without Xen devices"
set +e
output="$(podman run --rm --network=none "${limits[@]}" "$image" 2>&1)"
status=$?
set -e
if [ "$status" -ne 2 ] || ! grep -q "gntdev\|evtchn" <<<"$output"; then
    say "FAILED: expected exit 2 naming the missing Xen device, got $status: $output"; exit 1
fi
say "ok ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec) image, $(( $(date +%s) - started )) s)"
