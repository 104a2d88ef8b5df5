.PHONY: build test test-repeat tsan demo container-test e2e-xen fuzz ceph-test
build:
	swift build
test:
	scripts/test.sh
# The whole suite N times on one build; last line "N passed, M failed".
N ?= 5
test-repeat:
	scripts/test-repeat.sh $(N)
# The suites under ThreadSanitizer (a build of their own in .build-tsan).
tsan:
	scripts/tsan.sh
demo:
	scripts/demo.sh
container-test:
	scripts/container-test.sh
# Real Xen under QEMU (slow: ~10 min, ~6 GiB under /var/tmp/blkback-e2e; root). Not part of `test`.
e2e-xen:
	XEN_E2E=1 Tests/e2e-xen/run.sh
# libFuzzer over the parsers guests and clients reach (docs/fuzzing.md): each target for
# FUZZ_SECONDS (default 60), or FUZZ_RUNS executions each; the corpora in Fuzz/Corpus grow.
fuzz:
	scripts/fuzz.sh
# The RBD tests on a one-host Ceph cluster (mon, mgr, one OSD on a file; loopback only),
# started and stopped around them (scripts/ceph-cluster.sh; about 15 s to start).
ceph-test:
	scripts/ceph-test.sh
