#!/usr/bin/env bash
# Restarts under a guest that never reconnects: a simulated guest runs `--workload verify
# --no-reconnect` for SECONDS while blkback-server is SIGKILLed and started again KILLS times
# at random moments and restarted for an upgrade (SIGTERM) UPGRADES times. Passes when the
# guest exits 0 with no I/O error and no verification failure; prints the longest request
# latency the guest saw (the pause of the worst restart).
#   scripts/restart-torture.sh [SECONDS] [KILLS] [UPGRADES]   (default 60 20 2; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60} kills=${2:-20} upgrades=${3:-2}
swift build -c release >/dev/null
bin=$(swift build -c release --show-bin-path)
dir=$(mktemp -d /dev/shm/blkback-restarts.XXXXXX)
daemon="" guest=""
cleanup() {
    [ -n "$guest" ] && kill -KILL "$guest" 2>/dev/null || true
    [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
start() { "$bin/blkback-server" --sim "$dir" --listen 127.0.0.1:$port --log-level info >>"$dir/daemon.log" 2>&1 & daemon=$!; }
"$bin/xensim" run --dir "$dir" --detach >/dev/null
export XENSTORED_PATH=$dir/xenstored.sock
start
"$bin/xensim" domain create --dir "$dir" --domid 1 >/dev/null
truncate -s 256M "$dir/disk.img"
"$bin/xensim" attach --dir "$dir" --domid 1 --devid 51712 --target "$dir/disk.img"
"$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --workload verify --size 32M --qd 16 --queues 2 \
    --seconds "$seconds" --no-reconnect --json >"$dir/guest.json" 2>"$dir/guest.err" &
guest=$!
# The restarts, spread at random over the run; every (kills / upgrades)th one an upgrade.
total=$((kills + upgrades))
every=$(( total / (upgrades > 0 ? upgrades : 1) ))
for i in $(seq 1 "$total"); do
    sleep "$(awk -v s="$seconds" -v n="$total" -v r="$RANDOM" 'BEGIN { printf "%.3f", (s * 0.8 / n) * (0.5 + r / 32767) }')"
    kill -0 "$guest" 2>/dev/null || break
    if [ "$upgrades" -gt 0 ] && [ $((i % every)) -eq 0 ]; then signal=TERM; else signal=KILL; fi
    kill -"$signal" "$daemon"; wait "$daemon" 2>/dev/null || true
    start
done
status=0; wait "$guest" || status=$?
guest=""
python3 - "$dir/guest.json" "$status" "$(grep -c 'took the ring over' "$dir/daemon.log" || true)" <<'PY'
import json, sys
report, status, takeovers = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
print(f"guest exit {status}: {report['ops']} I/Os ({report['reads']} reads verified), errors {report['errors']}, "
      f"verify failures {report['verify_failures']}, reconnects {report['reconnects']}; {takeovers} ring takeovers")
print(f"latency p50 {report['lat_us']['p50']:.0f} us, p99 {report['lat_us']['p99']:.0f} us, "
      f"longest (across a restart) {report['lat_us']['max'] / 1000:.1f} ms")
sys.exit(0 if status == 0 and report["errors"] == 0 and report["verify_failures"] == 0 else 1)
PY
