#!/usr/bin/env bash
# Data-path benchmark: the same workloads through blkback-server (a simulated guest on its
# rings) and straight on the backing file with fio (io_uring, O_DIRECT), in the same run;
# prints one line per workload with the ratio ours / fio.
#   scripts/bench.sh [SECONDS]     (default 10 s per workload; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
scripts/install-deps.sh >/dev/null
swift build -c release >/dev/null
bin=$(swift build -c release --show-bin-path)
dir=$(mktemp -d /tmp/blkback-bench.XXXXXX)
daemon=""
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
disk="$dir/disk.img"
fio --name=fill --filename="$disk" --size=1G --rw=write --bs=1M --direct=1 --ioengine=io_uring >/dev/null

"$bin/xensim" run --dir "$dir" --detach >/dev/null
"$bin/blkback-server" --sim "$dir" --log-level warning 2>"$dir/daemon.log" &
daemon=$!
"$bin/xensim" domain create --dir "$dir" --domid 1 --memory-mb 256
"$bin/xensim" attach --dir "$dir" --domid 1 --devid 51712 --target "$disk"

# fio first (it leaves its own data behind), then one stamped pass by the guest so that every
# read the guest makes afterwards is verified.
workloads=("4k randread qd32|randread|4k|32" "4k randwrite qd32|randwrite|4k|32" "1M read qd8|read|1M|8" "1M write qd8|write|1M|8")
declare -A fio_iops
for w in "${workloads[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$w"
    fio_iops[$name]=$(fio --name=b --filename="$disk" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine=io_uring \
        --direct=1 --runtime="$seconds" --time_based --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])')
done
"$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload write --bs 1M --qd 8 --max-indirect-segments 256 >/dev/null

printf '%-22s %12s %12s %8s %10s\n' workload "ours IOPS" "fio IOPS" ratio "ours MiB/s"
for w in "${workloads[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$w"
    ours=$("$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload "$rw" \
        --bs "$bs" --qd "$qd" --seconds "$seconds" --max-indirect-segments 256 --json)
    python3 - "$name" "${fio_iops[$name]}" "$ours" <<'PY'
import json, sys
name, fio, ours = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
if ours["errors"] or ours["verify_failures"]:
    sys.exit(f"{name}: {ours['errors']} errors, {ours['verify_failures']} verify failures")
print(f"{name:<22} {ours['iops']:12.0f} {fio:12.0f} {ours['iops'] / fio:8.2f} {ours['mib_per_s']:10.1f}")
PY
done
