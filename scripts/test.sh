#!/usr/bin/env bash
# The test command: dependencies, build, then every test (unit and integration on the simulator).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build
swift test --parallel "$@"
# The HTTP API against openapi.yaml (schemathesis) and /metrics against the stats endpoint.
scripts/api-conformance.sh
# The RBD tests on a one-host Ceph cluster (Debian's ceph-mon/-osd/-mgr, loopback only; about
# 3 min with the install); BLKBACK_CEPH_TEST=0 skips them.
if [ "${BLKBACK_CEPH_TEST:-1}" = 1 ]; then scripts/ceph-test.sh; fi
# The fuzz targets still build, and every input of their corpora still passes (no fuzzing).
FUZZ_REGRESS=1 scripts/fuzz.sh
# Opt-in: the runtime image built with podman from host binaries, running the demo.
if [ "${BLKBACK_CONTAINER_TEST:-0}" = 1 ]; then scripts/container-test.sh; fi
# The real-Xen rig (minutes, root, QEMU) only on request: XEN_E2E=1 make test, or make e2e-xen.
if [ "${XEN_E2E:-0}" = 1 ]; then Tests/e2e-xen/run.sh; fi
