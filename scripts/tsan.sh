#!/usr/bin/env bash
# The suites under ThreadSanitizer: a build of their own (.build-tsan), every test target.
# The integration tests start blkback-server from that build, so the daemon runs
# instrumented too; every process writes its reports to a file of its own under
# .build-tsan/reports (and exits 66 after a report). Left out: the simulator's processes
# (xensim, and the demo test's daemon) come from the plain debug build, because libxenstore
# cancels its watch thread in xs_close (pthread_cancel inside read()), which TSan reports
# as "thread finished with ignores enabled" and dies on, whatever the code around it. For
# the same reason the in-process BackendManagerTests (whose managers watch, then close their
# xenstore connection) are skipped here; the daemon they test runs instrumented in the
# integration tests.
# Exit status 0 only when the tests pass and no process reported a race.
#   scripts/tsan.sh [extra swift test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scratch=.build-tsan
swift build
export BLKBACK_XENSIM_DIR=$PWD/.build/debug
swift build --sanitize=thread --scratch-path "$scratch"
swift build --build-tests --sanitize=thread --scratch-path "$scratch"
log=$scratch/tsan.log
reports_dir=$PWD/$scratch/reports
rm -rf "$reports_dir"
mkdir -p "$reports_dir"
# Children inherit these: keep going after a report so every race is listed, one file per pid.
export TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1 log_path=$reports_dir/report ${TSAN_OPTIONS:-}"
status=0
swift test --skip-build --sanitize=thread --scratch-path "$scratch" --skip "BackendManagerTests|DataPathMatrixTests" "$@" >"$log" 2>&1 || status=$?
grep -E '✘|Test run with|passed after|failed after' "$log" | tail -n 20 || true
# Every report starts with "WARNING: ThreadSanitizer" or "ThreadSanitizer:" (a fatal one).
reports=$(cat "$reports_dir"/report.* 2>/dev/null | grep -cE '^(WARNING: )?ThreadSanitizer' || true)
if [ "$reports" -gt 0 ]; then
    echo "tsan: $reports report(s) in $reports_dir; the first:"
    cat "$reports_dir"/report.* | grep -m1 -A30 -E '^(WARNING: )?ThreadSanitizer'
    status=1
fi
echo "tsan: tests exit $status, $reports ThreadSanitizer report(s) (log: $log)"
exit "$status"
