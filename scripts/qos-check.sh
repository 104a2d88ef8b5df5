#!/usr/bin/env bash
# QoS accuracy: guest 1 limited (PUT …/qos) and guest 2 unlimited, each on its own disk of one
# blkback-server, both 4 KiB random reads at QD32 for SECONDS; then guest 2 alone. Prints the
# limited guest's IOPS against its limit and the neighbour's IOPS beside it against alone.
#   scripts/qos-check.sh [LIMIT_IOPS] [SECONDS]   (default 2000 10; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${1:-2000} seconds=${2:-10}
swift build -c release >/dev/null
bin=$(swift build -c release --show-bin-path)
dir=$(mktemp -d /dev/shm/blkback-qos.XXXXXX)
data=$(mktemp -d /tmp/blkback-qos-disk.XXXXXX)
port=$((20000 + RANDOM % 20000))
daemon=""
cleanup() {
    [ -n "$daemon" ] && kill -INT "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$data"
}
trap cleanup EXIT
"$bin/xensim" run --dir "$dir" --detach >/dev/null
export XENSTORED_PATH=$dir/xenstored.sock
"$bin/blkback-server" --sim "$dir" --listen 127.0.0.1:$port --log-level warning 2>"$dir/daemon.log" &
daemon=$!
for domid in 1 2; do
    truncate -s 256M "$data/disk$domid.img"
    "$bin/xensim" domain create --dir "$dir" --domid $domid >/dev/null
    "$bin/xensim" attach --dir "$dir" --domid $domid --devid 51712 --target "$data/disk$domid.img"
    # A stamped pass first, so that every read the guests make is verified (and hits the disk).
    "$bin/xensim" frontend --dir "$dir" --domid $domid --devid 51712 --workload write --bs 1M --qd 8 \
        --max-indirect-segments 256 >/dev/null
done
curl -sf -X PUT -d "{\"total_iops\": $limit}" 127.0.0.1:$port/v1/vbds/1/51712/qos >/dev/null
guest() { "$bin/xensim" frontend --dir "$dir" --domid "$1" --devid 51712 --workload randread --bs 4k --qd 32 \
    --seconds "$seconds" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])'; }
guest 1 >"$dir/limited" & limited=$!
guest 2 >"$dir/beside" & beside=$!
wait $limited $beside
alone=$(guest 2)
python3 - "$limit" "$(cat "$dir/limited")" "$(cat "$dir/beside")" "$alone" <<'PY'
import sys
limit, limited, beside, alone = map(float, sys.argv[1:])
print(f"limited guest: {limited:.0f} IOPS for a limit of {limit:.0f} ({(limited / limit - 1) * 100:+.1f} %)")
print(f"unlimited neighbour: {beside:.0f} IOPS beside it, {alone:.0f} alone ({beside / alone:.2f}x)")
PY
