#!/usr/bin/env bash
# Runs the whole suite N times on one build: `swift test --parallel`, then the API
# conformance check, as `make test` runs them. Each run's log is kept under
# .build/test-repeat/. Prints the tests that failed (and in how many runs), and as its last
# line `N passed, M failed`. Exit status 0 only when every run passed.
#   scripts/test-repeat.sh N [extra swift test arguments, e.g. --filter DataPathTests]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
shift || true
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "test-repeat: N must be a positive number, not '$runs'" >&2; exit 2; }

scripts/install-deps.sh
swift build
swift build --build-tests
logs=.build/test-repeat
rm -rf "$logs"
mkdir -p "$logs"

passed=0
failed=0
declare -A failures=()
for run in $(seq 1 "$runs"); do
    log="$logs/run-$run.log"
    names=()
    if ! swift test --skip-build --parallel "$@" >"$log" 2>&1; then
        # Swift Testing names a failed test in its "✘ Test name() …" lines; XCTest in
        # "Test Case '…' failed". A run that failed without naming a test is named by its log.
        mapfile -t names < <( { grep -oE '✘ Test [^ ]+\(\)' "$log" | sed 's/^✘ Test //'
                                grep -oE "Test Case '[^']+' failed" "$log" | sed -E "s/Test Case '(.*)' failed/\1/"; } | sort -u)
        [ ${#names[@]} -gt 0 ] || names=("swift test (see $log)")
    fi
    if [ ${#names[@]} -eq 0 ] && [ -z "$*" ]; then
        scripts/api-conformance.sh >>"$log" 2>&1 || names=("api-conformance")
    fi
    if [ ${#names[@]} -eq 0 ]; then
        passed=$((passed + 1))
        echo "run $run/$runs: passed"
    else
        failed=$((failed + 1))
        echo "run $run/$runs: FAILED: ${names[*]} (log: $log)"
        for name in "${names[@]}"; do failures[$name]=$(( ${failures[$name]:-0} + 1 )); done
    fi
done
for name in "${!failures[@]}"; do echo "failed in ${failures[$name]} of $runs runs: $name"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
