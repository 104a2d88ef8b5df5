#!/usr/bin/env bash
# Data-path benchmark: the same workloads through blkback-server (a simulated guest on its
# rings) and straight on the backing file with fio (io_uring, O_DIRECT), in the same run;
# prints one line per workload: fio IOPS, ours with persistent grants and with grants mapped
# per request (ratios to fio), and the latency the backend adds at p50 and p99.
#   scripts/bench.sh [SECONDS]     (default 10 s per workload; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
scripts/install-deps.sh >/dev/null
swift build -c release >/dev/null
bin=$(swift build -c release --show-bin-path)
# The simulator's directory holds the guest's RAM (a file both processes map): it lives in
# /dev/shm, as RAM should, so data the backend reads into guest pages is not written back
# to the disk under test. The disk image stays on the file system being measured.
dir=$(mktemp -d /dev/shm/blkback-bench.XXXXXX)
data=$(mktemp -d /tmp/blkback-bench-disk.XXXXXX)
daemon=""
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$data"
}
trap cleanup EXIT
disk="$data/disk.img"
fio --name=fill --filename="$disk" --size=1G --rw=write --bs=1M --direct=1 --ioengine=io_uring >/dev/null

. scripts/bench-host.sh
start_simulated_host
"$bin/xensim" attach --dir "$dir" --domid 1 --devid 51712 --target "$disk"

# The guest writes one stamped pass first, so every read it makes afterwards is verified;
# fio only reads that file or writes where the guest's stamps are rewritten right after.
# Measured reads check a sample of their sectors (the first of every page and the last):
# fio, the baseline, never reads its data, and a guest's CPU is not dom0's on real Xen.
"$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload write --bs 1M --qd 8 --max-indirect-segments 256 >/dev/null

# One workload at a time: fio on the file, then the guest with persistent grants, then
# without, so that the three figures of a line share the machine's state.
workloads=("4k randread qd32|randread|4k|32" "4k randwrite qd32|randwrite|4k|32" "1M read qd8|read|1M|8"
           "1M write qd8|write|1M|8" "4k randread qd1|randread|4k|1")
printf '%-18s %10s %10s %6s %10s %6s   %s\n' workload "fio IOPS" "persistent" ratio "per-req" ratio \
    "latency added p50/p99 us (persistent)"
for w in "${workloads[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$w"
    fio --name=b --filename="$disk" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine=io_uring \
        --direct=1 --runtime="$seconds" --time_based --output-format=json >"$dir/fio.json"
    if [ "$rw" = write ] || [ "$rw" = randwrite ]; then
        # Put the guest's stamps back where fio wrote, so later reads verify.
        "$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload write --bs 1M --qd 8 \
            --max-indirect-segments 256 >/dev/null
    fi
    for mode in persistent no-persistent; do
        "$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload "$rw" --"$mode" \
            --bs "$bs" --qd "$qd" --seconds "$seconds" --max-indirect-segments 256 --verify-sectors sample \
            --json >"$dir/$mode.json"
    done
    python3 - "$name" "$dir/fio.json" "$dir/persistent.json" "$dir/no-persistent.json" <<'PY'
import json, sys
name = sys.argv[1]
job = json.load(open(sys.argv[2]))["jobs"][0]
side = job["read"] if job["read"]["iops"] > 0 else job["write"]
fio_iops = side["iops"]
pct = side["clat_ns"]["percentile"]
fio_p50, fio_p99 = pct["50.000000"] / 1000, pct["99.000000"] / 1000
runs = [json.load(open(p)) for p in sys.argv[3:]]
for run, mode in zip(runs, ["persistent", "per-request"]):
    if run["errors"] or run["verify_failures"]:
        sys.exit(f"{name} ({mode}): {run['errors']} errors, {run['verify_failures']} verify failures")
p, n = runs
added = f"{p['lat_us']['p50'] - fio_p50:.0f}/{p['lat_us']['p99'] - fio_p99:.0f}"
print(f"{name:<18} {fio_iops:10.0f} {p['iops']:10.0f} {p['iops'] / fio_iops:6.2f} {n['iops']:10.0f} {n['iops'] / fio_iops:6.2f}   {added}")
PY
done
