#!/usr/bin/env bash
# NBD data-path benchmark: the same workloads through blkback-server (a simulated guest on
# its rings, the VBD on an nbdkit export) and with fio's own nbd engine on the same export,
# in the same run; prints one line per workload: fio's IOPS, ours, the ratio, and the
# latency the backend adds at p50 and p99.
#   scripts/bench-nbd.sh [SECONDS]   (default 10 s per workload; release build)
# The export is nbdkit's memory plugin on a unix socket (NBD_BENCH_PLUGIN=file: a file in /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
scripts/install-deps.sh >/dev/null
swift build -c release --product blkback-server >/dev/null
swift build -c release --product xensim >/dev/null
bin=$(swift build -c release --show-bin-path)
dir=$(mktemp -d /dev/shm/blkback-bench-nbd.XXXXXX)
data=$(mktemp -d /tmp/blkback-bench-nbd.XXXXXX)
daemon="" server=""
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$data"
}
trap cleanup EXIT
socket="$data/nbd.sock"
uri="nbd+unix:///?socket=$socket"
if [ "${NBD_BENCH_PLUGIN:-memory}" = file ]; then
    truncate -s 1G "$data/export.img"
    nbdkit --foreground --exit-with-parent --unix "$socket" file file="$data/export.img" &
else
    nbdkit --foreground --exit-with-parent --unix "$socket" memory size=1G &
fi
server=$!
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done

"$bin/xensim" run --dir "$dir" --detach >/dev/null
"$bin/blkback-server" --sim "$dir" --log-level warning 2>"$dir/daemon.log" &
daemon=$!
"$bin/xensim" domain create --dir "$dir" --domid 1 --memory-mb 256
"$bin/xensim" attach --dir "$dir" --domid 1 --devid 51712 --target "$uri"

# One stamped pass first, so every read the guest makes afterwards is verified.
"$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload write --bs 1M --qd 8 --max-indirect-segments 256 >/dev/null

workloads=("4k randread qd32|randread|4k|32" "1M read qd8|read|1M|8" "4k randwrite qd32|randwrite|4k|32" "1M write qd8|write|1M|8")
printf '%-18s %10s %10s %6s   %s\n' workload "fio IOPS" "blkback" ratio "latency added p50/p99 us"
for w in "${workloads[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$w"
    fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=1G \
        --runtime="$seconds" --time_based --output-format=json --output="$dir/fio.json" >/dev/null
    if [ "$rw" = write ] || [ "$rw" = randwrite ]; then
        # Put the guest's stamps back where fio wrote, so later reads verify.
        "$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload write --bs 1M --qd 8 \
            --max-indirect-segments 256 >/dev/null
    fi
    "$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload "$rw" \
        --bs "$bs" --qd "$qd" --seconds "$seconds" --max-indirect-segments 256 --json >"$dir/guest.json"
    python3 - "$name" "$dir/fio.json" "$dir/guest.json" <<'PY'
import json, sys
name = sys.argv[1]
job = json.load(open(sys.argv[2]))["jobs"][0]
side = job["read"] if job["read"]["iops"] > 0 else job["write"]
pct = side["clat_ns"]["percentile"]
fio_p50, fio_p99 = pct["50.000000"] / 1000, pct["99.000000"] / 1000
run = json.load(open(sys.argv[3]))
if run["errors"] or run["verify_failures"]:
    sys.exit(f"{name}: {run['errors']} errors, {run['verify_failures']} verify failures")
added = f"{run['lat_us']['p50'] - fio_p50:.0f}/{run['lat_us']['p99'] - fio_p99:.0f}"
print(f"{name:<18} {side['iops']:10.0f} {run['iops']:10.0f} {run['iops'] / side['iops']:6.2f}   {added}")
PY
done
