#!/usr/bin/env bash
# Network-store benchmark: the same workloads through blkback-server (a simulated guest on
# its rings, the VBD on an NBD export or an RBD image) and with fio's own nbd or rbd engine
# on the same export or image, in the same run; prints one line per workload: fio's IOPS,
# ours, the ratio, and the latency the backend adds at p50 and p99.
#   scripts/bench-network.sh nbd|rbd [SECONDS]   (default 10 s per workload; release build)
# Each workload runs ROUNDS times (default 3), fio and the guest in turn; the line shows the
# medians, as a network store on two shared cores varies by tens of percent run to run.
# nbd: nbdkit's memory plugin on a unix socket (NBD_BENCH_PLUGIN=file: a file in /tmp).
# rbd: a 1 GiB image on a one-host cluster started for the run (scripts/ceph-cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:?usage: scripts/bench-network.sh nbd|rbd [SECONDS]}
seconds=${2:-10}
rounds=${ROUNDS:-3}
scripts/install-deps.sh >/dev/null
swift build -c release --product blkback-server >/dev/null
swift build -c release --product xensim >/dev/null
bin=$(swift build -c release --show-bin-path)
dir=$(mktemp -d /dev/shm/blkback-bench-net.XXXXXX)
data=$(mktemp -d /tmp/blkback-bench-net.XXXXXX)
daemon="" server=""
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    [ "$store" = rbd ] && scripts/ceph-cluster.sh stop "$data/ceph" >/dev/null || true
    "$bin/xensim" stop --dir "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$data"
}
trap cleanup EXIT

case $store in
nbd)
    socket="$data/nbd.sock"
    target="nbd+unix:///?socket=$socket"
    if [ "${NBD_BENCH_PLUGIN:-memory}" = file ]; then
        truncate -s 1G "$data/export.img"
        nbdkit --foreground --exit-with-parent --unix "$socket" file file="$data/export.img" &
    else
        nbdkit --foreground --exit-with-parent --unix "$socket" memory size=1G &
    fi
    server=$!
    for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
    fio_target=(--ioengine=nbd --uri="$target")
    ;;
rbd)
    scripts/ceph-cluster.sh start "$data/ceph" >/dev/null
    export CEPH_CONF="$data/ceph/ceph.conf"
    # The daemon runs librbd without its cache (a crash must not lose acknowledged writes);
    # fio gets the same.
    ceph config set client rbd_cache false
    rbd create --size 1G blkback/bench
    target="rbd:blkback/bench"
    fio_target=(--ioengine=rbd --clientname=admin --pool=blkback --rbdname=bench)
    ;;
*) echo "usage: scripts/bench-network.sh nbd|rbd [SECONDS]" >&2; exit 2 ;;
esac

. scripts/bench-host.sh
start_simulated_host
# Attached only while the guest runs: fio and the VBD never share the store (an RBD image's
# exclusive lock is the VBD's while it is attached).
attach() { "$bin/xensim" attach --dir "$dir" --domid 1 --devid 51712 --target "$target"; }
detach() { "$bin/xensim" detach --dir "$dir" --domid 1 --devid 51712 >/dev/null; }
guest() { "$bin/xensim" frontend --dir "$dir" --domid 1 --devid 51712 --max-indirect-segments 256 "$@"; }

# One stamped pass first, so every read the guest makes afterwards is verified. Measured
# reads check a sample of their sectors (the first of every page and the last): fio, the
# baseline, never reads its data, and a guest's CPU is not dom0's on real Xen.
attach; guest --workload write --bs 1M --qd 8 >/dev/null; detach

workloads=("4k randread qd32|randread|4k|32" "1M read qd8|read|1M|8" "4k randwrite qd32|randwrite|4k|32" "1M write qd8|write|1M|8")
printf '%-18s %10s %10s %6s   %s\n' workload "fio $store" "blkback" ratio "latency added p50/p99 us"
for w in "${workloads[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$w"
    for round in $(seq "$rounds"); do
        fio --name=b "${fio_target[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=1G \
            --runtime="$seconds" --time_based --output-format=json --output="$dir/fio.$round.json" >/dev/null
        attach
        if [ "$rw" = write ] || [ "$rw" = randwrite ]; then
            # Put the guest's stamps back where fio wrote, so later reads verify.
            guest --workload write --bs 1M --qd 8 >/dev/null
        fi
        guest --workload "$rw" --bs "$bs" --qd "$qd" --seconds "$seconds" --verify-sectors sample --json >"$dir/guest.$round.json"
        detach
    done
    python3 - "$name" "$dir" "$rounds" <<'PY'
import json, statistics, sys
name, directory, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
fio, ours = [], []
for r in range(1, rounds + 1):
    job = json.load(open(f"{directory}/fio.{r}.json"))["jobs"][0]
    side = job["read"] if job["read"]["iops"] > 0 else job["write"]
    pct = side["clat_ns"]["percentile"]
    fio.append((side["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000))
    run = json.load(open(f"{directory}/guest.{r}.json"))
    if run["errors"] or run["verify_failures"]:
        sys.exit(f"{name}: {run['errors']} errors, {run['verify_failures']} verify failures")
    ours.append((run["iops"], run["lat_us"]["p50"], run["lat_us"]["p99"]))
median = lambda rows, i: statistics.median(row[i] for row in rows)
added = f"{median(ours, 1) - median(fio, 1):.0f}/{median(ours, 2) - median(fio, 2):.0f}"
print(f"{name:<18} {median(fio, 0):10.0f} {median(ours, 0):10.0f} {median(ours, 0) / median(fio, 0):6.2f}   {added}")
PY
done
