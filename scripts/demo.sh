#!/usr/bin/env bash
# The simulator demo: a simulated Xen (xensim), blkback-server serving it with its HTTP API,
# domain 1 with a sparse disk file attached, and a guest running a continuous verified
# workload (every read is checked against what the guest last wrote there).
#
#   scripts/demo.sh              set up, build, run until Ctrl-C; then stop everything it started
#   scripts/demo.sh --check N    run N seconds, stop cleanly; exit 1 if the guest saw an error
#
# Environment:
#   DEMO_SECONDS=N       same as --check N
#   DEMO_LISTEN          the API address (default 127.0.0.1:8080)
#   DEMO_DISK_SIZE       size of the sparse disk file (default 256M)
#   DEMO_REGION          part of the disk the guest uses (default 64M: more re-reads to verify)
#   DEMO_BIN_DIR         use the xensim and blkback-server found there; skips apt and the build
#   DEMO_CONFIGURATION   debug (default) or release, for the build
#   DEMO_KEEP=1          keep the simulator directory (logs, disk) after the end
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${DEMO_SECONDS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --check) seconds="${2:?--check needs a number of seconds}"; shift 2 ;;
        --check=*) seconds="${1#--check=}"; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
if [ -n "$seconds" ] && ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "demo.sh: --check needs a whole number of seconds, not '$seconds'" >&2; exit 2
fi
listen="${DEMO_LISTEN:-127.0.0.1:8080}"
disk_size="${DEMO_DISK_SIZE:-256M}"
region="${DEMO_REGION:-64M}"
domid=1
devid=51712
api="http://$listen"

say() { printf '\033[1mdemo:\033[0m %s\n' "$*"; }
# The guest's JSON report in one line: the fields an operator looks at.
summary() {
    local field out=""
    for field in ops iops mib_per_s errors verify_failures reconnects; do
        out+="$field $(grep -o "\"$field\":[0-9.]*" "$1" | head -1 | cut -d: -f2 | cut -c1-8), "
    done
    echo "${out%, }"
}

if [ -n "${DEMO_BIN_DIR:-}" ]; then
    bin="$DEMO_BIN_DIR"
else
    scripts/install-deps.sh
    configuration="${DEMO_CONFIGURATION:-debug}"
    say "building ($configuration)"
    swift build -c "$configuration"
    bin="$(swift build -c "$configuration" --show-bin-path)"
fi
for tool in xensim blkback-server; do
    [ -x "$bin/$tool" ] || { echo "demo.sh: $bin/$tool is missing; build with swift build" >&2; exit 2; }
done

dir="$(mktemp -d "${TMPDIR:-/tmp}/blkback-demo.XXXXXX")"
sim_started=""
daemon_pid=""
guest_pid=""
backend="/local/domain/0/backend/vbd/$domid/$devid"

# Ends what this script started, by pid, in the order that lets each part close cleanly:
# the guest closes its device, the daemon drains and exits, then the simulator.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$guest_pid" ] && kill -0 "$guest_pid" 2>/dev/null; then
        kill -INT "$guest_pid"; wait_for_exit "$guest_pid" 20 || true
    fi
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"
        wait_for_exit "$daemon_pid" 15 || { say "blkback-server did not stop on SIGTERM within 15 s"; status=1; }
    fi
    if [ -n "$sim_started" ]; then "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true; fi
    if [ -s "$dir/guest.json" ]; then
        say "guest: $(summary "$dir/guest.json")"
        if ! grep -q '"errors":0' "$dir/guest.json" || ! grep -q '"verify_failures":0' "$dir/guest.json"; then status=1; fi
    fi
    if [ "${DEMO_KEEP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
        say "kept $dir (logs: blkback-server.log, guest.log, xensim.log)"
    else
        rm -rf "$dir"
    fi
    exit "$status"
}
trap cleanup EXIT
# Ctrl-C (or SIGTERM) is how the demo ends: exit 0 unless the guest reports a failure.
trap 'exit 0' INT TERM

# Waits until our child `pid` ends (SIGKILL after N seconds); its status goes to exit_status.
exit_status=0
wait_for_exit() {
    local pid=$1 limit=$2 waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt $((limit * 10)) ]; do
        sleep 0.1; waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null && waited=-1
    exit_status=0; wait "$pid" 2>/dev/null || exit_status=$?
    [ "$waited" -ge 0 ]
}

say "simulator in $dir"
"$bin/xensim" run --dir "$dir" --detach >/dev/null
sim_started=1

# setsid: Ctrl-C reaches only this script, which then stops the parts in order.
setsid "$bin/blkback-server" --sim "$dir" --listen "$listen" >"$dir/blkback-server.log" 2>&1 &
daemon_pid=$!
"$bin/xensim" domain create --dir "$dir" --domid "$domid"
truncate -s "$disk_size" "$dir/disk.img"
if ! "$bin/xensim" attach --dir "$dir" --domid "$domid" --devid "$devid" --target "$dir/disk.img"; then
    say "attach failed; blkback-server said:"; cat "$dir/blkback-server.log"; exit 1
fi
say "blkback-server (pid $daemon_pid) serves $backend: a $disk_size sparse file"

# The guest: randrw with verification; it reconnects by itself when the backend offers the
# device again after a close.
start_guest() {
    setsid "$bin/xensim" frontend --dir "$dir" --domid "$domid" --devid "$devid" \
        --workload randrw --size "$region" --qd 16 --flush-every 256 --seconds "${seconds:-86400}" --json \
        >"$dir/guest.json" 2>>"$dir/guest.log" &
    guest_pid=$!
}
start_guest
export XENSTORED_PATH="$dir/xenstored.sock"
for _ in $(seq 100); do
    [ "$(xenstore-read "$backend/state" 2>/dev/null)" = 4 ] && break
    kill -0 "$guest_pid" 2>/dev/null || break
    sleep 0.1
done
if [ "$(xenstore-read "$backend/state" 2>/dev/null)" != 4 ]; then
    say "the guest did not connect:"; cat "$dir/guest.log"; tail -5 "$dir/blkback-server.log"; exit 1
fi
say "guest (pid $guest_pid) connected: randrw over $region, every read verified"

cat <<EOF

  Try (HTTP API on $listen):
    curl -s $api/healthz
    curl -s $api/v1/vbds
    curl -s $api/v1/vbds/$domid/$devid
    curl -s $api/v1/vbds/$domid/$devid/stats          # twice: the counters grow
    curl -s $api/metrics | grep '^blkback_'
    curl -s -X POST -d '{"state":"closing"}' $api/v1/vbds/$domid/$devid/state
    curl -s -X POST -d '{"state":"reconnect"}' $api/v1/vbds/$domid/$devid/state
    # the guest sees the close and reconnects: tail -f $dir/guest.log
    curl -sN $api/v1/events                           # what happens, as it happens (Ctrl-C)

  Or with the operator's CLI (swift build --product blkbackctl):
    BLKBACK_URL=$api .build/debug/blkbackctl list
    BLKBACK_URL=$api .build/debug/blkbackctl watch

  Straight from xenstore (Debian's xenstore-utils):
    XENSTORED_PATH=$dir/xenstored.sock xenstore-ls $backend
    XENSTORED_PATH=$dir/xenstored.sock xenstore-watch $backend/state

EOF

if [ -n "$seconds" ]; then
    say "running for $seconds s"
    wait_for_exit "$guest_pid" $((seconds + 60)) || true
    guest_status=$exit_status
    guest_pid=""
    report="$(cat "$dir/guest.json")"
    if [ "$guest_status" -ne 0 ] || ! grep -q '"errors":0' <<<"$report" || ! grep -q '"verify_failures":0' <<<"$report"; then
        say "FAILED: the guest exited $guest_status"; cat "$dir/guest.log"; exit 1
    fi
    kill -0 "$daemon_pid" 2>/dev/null || { say "FAILED: blkback-server died"; cat "$dir/blkback-server.log"; exit 1; }
    say "ok: the guest's verified workload ran $seconds s without an error"
    exit 0
fi

say "running; Ctrl-C stops everything"
while true; do
    if ! kill -0 "$daemon_pid" 2>/dev/null; then say "blkback-server ended:"; tail -5 "$dir/blkback-server.log"; exit 1; fi
    if ! kill -0 "$guest_pid" 2>/dev/null; then
        wait_for_exit "$guest_pid" 0 || true
        guest_pid=""
        if [ "$exit_status" -eq 0 ]; then start_guest; else say "the guest failed:"; tail -5 "$dir/guest.log"; exit 1; fi
    fi
    sleep 1
done
