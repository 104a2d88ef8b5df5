#!/usr/bin/env bash
# The RBD tests against a real one-host Ceph cluster: installs Debian's Ceph daemons, starts
# a monitor, a manager and one OSD on a file, on loopback (scripts/ceph-cluster.sh), runs
# the RBDTests suite on it, and stops everything it started, whatever the outcome.
#   scripts/ceph-test.sh [swift test options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh ceph-mon ceph-osd ceph-mgr ceph-common
swift build --build-tests
cluster=$(mktemp -d /tmp/blkback-ceph.XXXXXX)
cleanup() {
    scripts/ceph-cluster.sh stop "$cluster" || true
    rm -rf "$cluster"
}
trap cleanup EXIT
scripts/ceph-cluster.sh start "$cluster"
BLKBACK_CEPH_DIR="$cluster" swift test --skip-build --filter 'RBDTests|RBDUnreachableTests' "$@"
