#!/usr/bin/env bash
# XSA-332 on the simulator: one guest notifies every ring of its device without pause and
# with no requests (xensim attack event-storm, 4 queues) beside an honest guest reading at
# QD1. Prints the daemon's CPU share and the honest guest's p99 read latency, quiet and under
# the storm, and the spurious notifications the daemon counted. Usage: storm-check.sh [SECONDS]
# On real Xen the attacker spins on its own vCPU: here it is pinned to the last CPU and dom0's
# side (daemon, simulator, honest guest) to the others, so that the figures show what the
# storm costs dom0, not a CPU the attacker took.
# Ends everything it started, by pid. Needs a built tree (swift build).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
. scripts/lib/sim-session.sh storm
last=$(( $(nproc) - 1 ))
[ "$last" -ge 1 ] || { echo "storm-check: needs 2 CPUs (the attacker gets one)" >&2; exit 2; }
dom0="taskset -c 0-$((last - 1))"
$dom0 "$bin/xensim" run --dir "$work" --detach >/dev/null
$dom0 "$bin/blkback-server" --sim "$work" --listen "127.0.0.1:$port" --max-queues 4 --log-level warning >"$work/daemon.log" 2>&1 &
daemon=$!
pids+=($daemon)
for domid in 1 2; do
    truncate -s 256M "$work/disk$domid.img"
    "$bin/xensim" domain create --dir "$work" --domid $domid >/dev/null
    "$bin/xensim" attach --dir "$work" --domid $domid --devid 51712 --target "$work/disk$domid.img" >/dev/null
done
ticks=$(getconf CLK_TCK)
simulator=$(cat "$work/xensim.pid")
cpu() { awk '{ print $14 + $15 }' "/proc/${1:-$daemon}/stat"; }
# The honest guest: 4 KiB random reads at QD1 for $seconds; its p99 in microseconds.
honest() {
    $dom0 "$bin/xensim" frontend --dir "$work" --domid 2 --devid 51712 --workload randread --bs 4k --qd 1 \
        --seconds "$seconds" --json 2>>"$work/honest.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lat_us"]["p99"])'
}
share() { python3 -c "print(f'{($2 - $1) / $ticks / $seconds * 100:.1f}')"; }
measure() { # label
    local before after sim_before sim_after p99
    before=$(cpu); sim_before=$(cpu "$simulator"); p99=$(honest); after=$(cpu); sim_after=$(cpu "$simulator")
    echo "$1 $p99 $(share "$before" "$after") $(share "$sim_before" "$sim_after")"
}
read -r _ quiet_p99 quiet_cpu quiet_sim < <(measure quiet)
taskset -c "$last" "$bin/xensim" attack --dir "$work" --domid 1 --devid 51712 --name event-storm --queues 4 \
    --seconds $((seconds + 3)) >"$work/attack.out" 2>&1 &
attack=$!
pids+=($attack)
sleep 1
read -r _ storm_p99 storm_cpu storm_sim < <(measure storm)
spurious=$(curl -s "127.0.0.1:$port/v1/vbds/1/51712/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["spurious_events"])')
queues=$(curl -s "127.0.0.1:$port/v1/vbds/1/51712" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queues"])')
attack_status=0
wait $attack || attack_status=$?
pids=("${pids[@]/$attack}")
echo "event storm on $queues ring(s) of domain 1, honest QD1 reader on domain 2, $seconds s each:"
echo "  daemon CPU: quiet ${quiet_cpu}% of one CPU, storm ${storm_cpu}%"
echo "  simulated hypervisor (xensim run) CPU: quiet ${quiet_sim}%, storm ${storm_sim}% (in Xen this is the attacker's own vCPU)"
echo "  honest p99: quiet ${quiet_p99} us, storm ${storm_p99} us, ratio $(python3 -c "print(f'{$storm_p99 / $quiet_p99:.2f}')")"
echo "  spurious notifications counted on the stormed device: $spurious"
grep -o '[0-9]* notifications/s.*' "$work/attack.out" | sed 's/^/  attacker: /' || true
[ $attack_status = 0 ] || { echo "storm-check: the attack failed (its reads were not answered):"; cat "$work/attack.out"; exit 1; }
