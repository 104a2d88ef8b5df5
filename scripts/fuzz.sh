#!/usr/bin/env bash
# Builds the libFuzzer targets of Fuzz/ (docs/fuzzing.md) and runs each over its corpus in
# Fuzz/Corpus/<target>, adding what raises coverage.
#   scripts/fuzz.sh                 every target for FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh FuzzBlkifRing   one target
#   FUZZ_RUNS=10000000 scripts/fuzz.sh   a number of executions instead of a time
#   FUZZ_REGRESS=1 scripts/fuzz.sh  only replay the corpora (what the test command runs)
#   FUZZ_SCRATCH=.build-2 ...       another build directory (a second run beside a running one)
# Prints one line per target: executions, executions/s, corpus size, crashes (a crash stops
# the run; libFuzzer leaves the input as Fuzz/crash-*).
set -euo pipefail
cd "$(dirname "$0")/../Fuzz"
TARGETS=(FuzzBlkifRing FuzzXenbusValues FuzzXenstoredWire FuzzManagementAPI)
[[ $# -gt 0 ]] && TARGETS=("$@")

scratch=${FUZZ_SCRATCH:-.build}
# SwiftPM keeps the parent package's file lists in the build plan: drop it, so files added
# to the daemon since the last fuzz build are seen (the objects stay; the build is incremental).
rm -f "$scratch/release.yaml" "$scratch/release/description.json" "$scratch/build.db"
swift build -c release --scratch-path "$scratch" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library \
    -Xswiftc -use-ld=lld 2>&1 | grep -Ev "warning: Cannot export local symbol" >&2
BIN=$(swift build -c release --scratch-path "$scratch" --show-bin-path)

for target in "${TARGETS[@]}"; do
    corpus=Corpus/$target
    mkdir -p "$corpus"
    dict=()
    [[ -f Dictionaries/$target.dict ]] && dict=(-dict="Dictionaries/$target.dict")
    log=$(mktemp)
    if [[ ${FUZZ_REGRESS:-0} == 1 ]]; then
        args=(-runs=0)
    elif [[ -n ${FUZZ_RUNS:-} ]]; then
        args=(-runs="$FUZZ_RUNS")
    else
        args=(-max_total_time="${FUZZ_SECONDS:-60}")
    fi
    status=0
    "$BIN/$target" "${args[@]}" "${dict[@]}" -max_len=8192 -print_final_stats=1 \
        -artifact_prefix=./crash-"$target"- "$corpus" >"$log" 2>&1 || status=$?
    runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
    rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log")
    echo "$target: ${runs:-0} executions, ${rate:-0}/s, corpus $(ls "$corpus" | wc -l) inputs, exit $status"
    if [[ $status != 0 ]]; then
        grep -E "ERROR|fuzz invariant|Fatal error|SUMMARY|Test unit written" "$log" | head -20 >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
done
