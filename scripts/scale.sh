#!/usr/bin/env bash
# Many VBDs on one daemon, in the simulator: attaches DOMAINS × 4 disks (default 250 × 4 =
# 1,000), runs a verified workload on a few, and prints the daemon's RSS per idle VBD, its
# threads and open descriptors, the time of GET /v1/vbds and of /metrics, the attach rate,
# and whether threads and descriptors come back to where they started once every VBD is
# detached. Usage: scale.sh [DOMAINS] [SOAK_SECONDS] — with SOAK_SECONDS, random attach /
# detach / I/O runs that long before the detach, and the RSS growth over it is printed.
# Ends everything it started, by pid. Needs a built tree (swift build).
set -euo pipefail
cd "$(dirname "$0")/.."
domains=${1:-250}
soak=${2:-0}
. scripts/lib/sim-session.sh scale
"$bin/xensim" run --dir "$work" --detach >/dev/null
"$bin/blkback-server" --sim "$work" --listen "127.0.0.1:$port" --log-level warning >"$work/daemon.log" 2>&1 &
daemon=$!
pids+=($daemon)
api="http://127.0.0.1:$port"
until curl -sf "$api/healthz" >/dev/null; do sleep 0.1; done
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$daemon/status"; }
threads() { ls "/proc/$daemon/task" | wc -l; }
# The daemon's descriptors, less the simulated grant table's files of the guest domains it
# mapped (four per domain, kept while the domain exists; on Xen one gntdev handle serves all).
fds() { for fd in /proc/$daemon/fd/*; do readlink "$fd"; done | grep -vc "^$work/domains/" || true; }
simfds() { for fd in /proc/$daemon/fd/*; do readlink "$fd"; done | grep -c "^$work/domains/" || true; }
count() { curl -sf "$api/v1/vbds" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["vbds"]))'; }
# Seconds one GET takes (median of 5).
timed() { for _ in 1 2 3 4 5; do curl -sf -o /dev/null -w '%{time_total}\n' "$api$1"; done | sort -n | sed -n 3p; }
devids=(51712 51728 51744 51760)
attach() { # domid devid
    truncate -s 64M "$work/d$1-$2.img"
    "$bin/xensim" attach --dir "$work" --domid "$1" --devid "$2" --target "$work/d$1-$2.img" >/dev/null
}

start_rss=$(rss); start_threads=$(threads); start_fds=$(fds)
started=$(date +%s.%N)
for domid in $(seq 1 "$domains"); do
    "$bin/xensim" domain create --dir "$work" --domid "$domid" >/dev/null
    for devid in "${devids[@]}"; do attach "$domid" "$devid"; done
done
attached=$(( domains * 4 ))
until [ "$(count)" = "$attached" ]; do sleep 0.2; done
elapsed=$(python3 -c "import time; print(time.time() - $started)")
idle_rss=$(rss)
echo "$attached VBDs attached in $(printf %.1f "$elapsed") s ($(python3 -c "print(f'{$attached / $elapsed:.0f}')") per second, xensim attach included)"
echo "  daemon RSS: $start_rss KiB at start, $idle_rss KiB with $attached idle VBDs: $(( (idle_rss - start_rss) / attached )) KiB per idle VBD"
echo "  threads: $start_threads → $(threads); open descriptors: $start_fds → $(fds)"
echo "  GET /v1/vbds: $(timed /v1/vbds) s; GET /metrics: $(timed /metrics) s (medians of 5)"

# I/O on a few of them at once.
guests=()
for domid in 1 2 3 4; do
    "$bin/xensim" frontend --dir "$work" --domid "$domid" --devid 51712 --workload verify --bytes 16M --json \
        >"$work/guest$domid.json" 2>&1 &
    guests+=($!)
done
failed=0
for pid in "${guests[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "  4 guests verified 16 MiB each beside the idle ones: $failed failed; RSS now $(rss) KiB, threads $(threads)"

if [ "$soak" -gt 0 ]; then
    soak_start_rss=$(rss)
    deadline=$((SECONDS + soak)); rounds=0
    # RSS every tenth of the soak: growth that levels off is the allocator warming up, growth
    # that keeps its pace is a leak.
    samples=(); next_sample=$((SECONDS + soak / 10))
    while [ $SECONDS -lt $deadline ]; do
        if [ $SECONDS -ge $next_sample ]; then samples+=("$(rss)"); next_sample=$((next_sample + soak / 10)); fi
        domid=$(( RANDOM % domains + 1 )); devid=${devids[$(( RANDOM % 4 ))]}
        "$bin/xensim" detach --dir "$work" --domid "$domid" --devid "$devid" >/dev/null
        attach "$domid" "$devid"
        "$bin/xensim" frontend --dir "$work" --domid "$domid" --devid "$devid" --workload verify --bytes 1M --json \
            >/dev/null 2>&1 || { echo "soak: a verify run failed on $domid/$devid"; exit 1; }
        rounds=$((rounds + 1))
    done
    echo "  soak: $rounds detach/attach/verify rounds in $soak s; RSS $soak_start_rss → $(rss) KiB ($(python3 -c "print(f'{($(rss) - $soak_start_rss) * 100 / $soak_start_rss:+.1f}')") %)"
    echo "  soak RSS every $((soak / 10)) s (KiB): ${samples[*]} $(rss)"
fi

for domid in $(seq 1 "$domains"); do
    for devid in "${devids[@]}"; do "$bin/xensim" detach --dir "$work" --domid "$domid" --devid "$devid" >/dev/null; done
done
until [ "$(count)" = 0 ]; do sleep 0.2; done
# Ring threads end once their rings are released, and libdispatch's idle workers a few
# seconds later: wait for them (up to 20 s) before judging.
for _ in $(seq 1 100); do
    [ "$(threads)" = "$start_threads" ] && [ "$(fds)" = "$start_fds" ] && break
    sleep 0.2
done
end_threads=$(threads); end_fds=$(fds)
echo "  after detaching all: threads $end_threads (start $start_threads), descriptors $end_fds (start $start_fds), RSS $(rss) KiB; simulated grant-table files of mapped domains: $(simfds)"
[ "$end_threads" = "$start_threads" ] && [ "$end_fds" = "$start_fds" ] || { echo "scale: threads or descriptors were not given back"; exit 1; }
