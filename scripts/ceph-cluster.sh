#!/usr/bin/env bash
# A throw-away one-host Ceph cluster for tests and benchmarks: one monitor, one manager and
# one bluestore OSD on a sparse file, on 127.0.0.1 only; everything it writes (conf, keyrings,
# data, logs, admin sockets, pid files) is under DIR.
#   scripts/ceph-cluster.sh start DIR   # on return pool "blkback" (size 1, rbd) is ready
#   scripts/ceph-cluster.sh stop DIR    # stops the daemons whose pids start recorded in DIR
#   scripts/ceph-cluster.sh env DIR     # prints: export CEPH_CONF=DIR/ceph.conf
# Clients need only CEPH_CONF: the admin keyring is named in DIR/ceph.conf, e.g.
#   eval "$(scripts/ceph-cluster.sh env DIR)"; rbd create blkback/img --size 256M
#   fio --name=x --ioengine=rbd --clientname=admin --pool=blkback --rbdname=img --rw=randread ...
# CEPH_CLUSTER_PORT_BASE (default 20000): each cluster takes the first block of 100 ports from
# there with nothing listening in it (below Linux's ephemeral range, so no outgoing connection
# holds them). CEPH_CLUSTER_OSD_SIZE (default 4G): size of the OSD's sparse file.
set -euo pipefail

script=$(readlink -f "${BASH_SOURCE[0]}")
pool=blkback
daemons=(osd.0 mgr.x mon.a) # stop order: the OSD tells the monitor it is going, so mon last

usage() { sed -n '5,7s/^# *//p' "$script" >&2; exit 2; }
say() { echo "ceph-cluster: $*"; }

# Absolute DIR (ceph.conf holds absolute paths); refuse whitespace, ceph.conf values can't quote.
absdir() {
    [ -d "$1" ] || { echo "ceph-cluster: no directory $1" >&2; exit 1; }
    local d; d=$(cd "$1" && pwd -P)
    case $d in
    *[[:space:]]*) echo "ceph-cluster: DIR may not contain whitespace: $d" >&2; exit 1 ;;
    esac
    echo "$d"
}

# A pid counts as alive while it is not a zombie (our daemons' reaper may never reap them).
alive() { local s; s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ "$s" != Z ]; }

# The recorded pid of NAME if it still runs our daemon (guards against pid reuse).
daemon_pid() {
    local f=$dir/run/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(<"$f")
    alive "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $dir/ceph.conf" &&
        echo "$pid"
}

# SIGTERM to the daemons' process groups (setsid made each a leader), SIGKILL after ~10 s.
stop_daemons() {
    local name pid pids=() i
    for name in "$@"; do
        pid=$(daemon_pid "$name") || { rm -f "$dir/run/$name.pid"; continue; }
        kill -TERM -- "-$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    for ((i = 0; i < 100; i++)); do
        local left=()
        for pid in ${pids[@]+"${pids[@]}"}; do alive "$pid" && left+=("$pid"); done
        pids=(${left[@]+"${left[@]}"})
        [ ${#pids[@]} -eq 0 ] && break
        sleep 0.1
    done
    for pid in ${pids[@]+"${pids[@]}"}; do
        say "pid $pid ignored SIGTERM for 10 s, sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.1; done
    done
    for name in "$@"; do rm -f "$dir/run/$name.pid"; done
}

cmd_stop() {
    # OSD and mgr first while the monitor can still hear the OSD's goodbye, then the monitor.
    stop_daemons osd.0 mgr.x
    stop_daemons mon.a
}

# Run NAME's command in the background in its own session, its output in DIR/log/NAME.out.
# Every inherited fd above 2 is closed: a caller's pipe (or our port lock) must not stay open
# for the daemon's lifetime. Without job control the subshell is no group leader, so setsid
# execs in place and $! is the daemon's pid.
launch() {
    local name=$1; shift
    (
        for fd in "/proc/$BASHPID/fd/"*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] && eval "exec $fd>&-"
        done
        exec setsid "$@"
    ) </dev/null >"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/run/$name.pid"
    # Until the exec the pid runs bash, which daemon_pid would take for a dead daemon.
    local i
    for ((i = 0; i < 100; i++)); do
        daemon_pid "$name" >/dev/null && return
        sleep 0.05
    done
    fail "$name did not start" "$name"
}

# ceph CLI that gives up instead of hanging when the monitor is not there.
ceph_() { timeout 30 ceph --connect-timeout 20 "$@"; }

# The tail of NAME's log and stdout/stderr for failures, without the dump of recent events
# and the backtrace frames a crash appends (they would push the assertion out of view).
show_log() {
    local f
    for f in "$dir/log/ceph-$1.log" "$dir/log/$1.mkfs.out" "$dir/log/$1.out"; do
        [ -s "$f" ] || continue
        echo "---- tail of $f" >&2
        sed '/--- begin dump of recent events ---/,$d' "$f" |
            grep -vE '^$|^ [0-9]+: |^ NOTE: |^ in thread |^ ceph version ' | tail -n 15 >&2
    done
}

failed_on="" # daemon whose log explains the current step
started=0 mkfs_pid=""
on_start_exit() {
    local rc=$?
    [ "$started" = 1 ] && return
    [ "$rc" = 0 ] && rc=1
    say "start failed" >&2
    [ -z "$mkfs_pid" ] || { kill "$mkfs_pid"; wait "$mkfs_pid"; } 2>/dev/null || true
    local name
    for name in ${failed_on:-${daemons[@]}}; do show_log "$name"; done
    cmd_stop
    exit "$rc"
}

fail() { say "$1" >&2; failed_on=${2:-$failed_on}; exit 1; }

# Run a command silently; on failure show its output and fail.
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; fail "failed: $*"; }; }

# Wait up to $1 s for the shell condition $2, failing if daemon $3 dies meanwhile.
wait_for() {
    local secs=$1 cond=$2 name=$3 end=$((SECONDS + $1))
    failed_on=$name
    until eval "$cond"; do
        daemon_pid "$name" >/dev/null || fail "$name exited" "$name"
        [ $SECONDS -lt $end ] || fail "timed out after ${secs}s waiting for: $cond" "$name"
        sleep 0.5
    done
}

# One `ceph -s` as JSON, judged by python: prints what is still missing, nothing when ready.
# Ready: OSD up+in, mgr available, all PGs active+clean, HEALTH_OK.
status_missing() {
    ceph_ -s -f json 2>/dev/null | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    print("no status"); sys.exit()
o = s["osdmap"]; o = o.get("osdmap", o)  # nested before quincy
need = []
if o["num_up_osds"] < 1 or o["num_in_osds"] < 1: need.append("osd up+in")
if not s["mgrmap"]["available"]: need.append("mgr")
pg = s["pgmap"]
clean = sum(x["count"] for x in pg.get("pgs_by_state", []) if x["state_name"] == "active+clean")
if pg["num_pgs"] == 0 or clean != pg["num_pgs"]: need.append("pgs active+clean")
h = s["health"]
if h["status"] != "HEALTH_OK": need.append(h["status"] + ": " + "; ".join(
    k + " " + v["summary"]["message"] for k, v in h["checks"].items()))
print(", ".join(need))
'
}

osd_up_in() {
    [ "$(ceph_ osd stat -f json 2>/dev/null | python3 -c '
import json, sys
o = json.load(sys.stdin)
print(o["num_up_osds"], o["num_in_osds"])' 2>/dev/null)" = "1 1" ]
}

# A keyring section: NAME KEY [SUBSYSTEM CAPS]...
keyring() {
    printf '[%s]\n\tkey = %s\n' "$1" "$2"
    shift 2
    while [ $# -gt 0 ]; do printf '\tcaps %s = "%s"\n' "$1" "$2"; shift 2; done
}

cmd_start() {
    mkdir -p "$1"
    dir=$(absdir "$1")
    [ -e "$dir/ceph.conf" ] && { echo "ceph-cluster: $dir already holds a cluster" >&2; exit 1; }
    export CEPH_CONF=$dir/ceph.conf
    local t0=$SECONDS
    trap on_start_exit EXIT
    mkdir -p "$dir"/{log,run,crash,mon/ceph-a,mgr/ceph-x,osd/ceph-0}

    # Port choice and monitor bind happen under a lock shared by all runs of this script (the
    # script file itself, so nothing is written outside DIR): two concurrent starts can't pick
    # the same block. Cluster ports: mon v2 = base, mon v1 = base+1, other daemons base+2..99.
    exec 9<"$script"
    flock -w 120 9 || fail "another start held the port lock for 120 s"
    local base=${CEPH_CLUSTER_PORT_BASE:-20000} port="" b listening
    listening=$(ss -Htln | awk '{ sub(/.*:/, "", $4); print $4 }')
    for ((b = base; b < base + 100 * 100; b += 100)); do
        awk -v lo="$b" -v hi=$((b + 99)) '$1 >= lo && $1 <= hi { f = 1 } END { exit !f }' \
            <<<"$listening" || { port=$b; break; }
    done
    [ -n "$port" ] || fail "no free block of 100 ports from $base"

    local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
# Loopback only: addresses are picked from these networks, daemons' ports from this block.
public_network = 127.0.0.0/8
cluster_network = 127.0.0.0/8
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_port_min = $((port + 2))
ms_bind_port_max = $((port + 99))
# Nothing under /var/run/ceph, /var/lib/ceph or /var/log/ceph.
run_dir = $dir/run
crash_dir = $dir/crash
mon_cluster_log_file = $dir/log/\$cluster.log
# One OSD: pools of size 1 without warnings about it, few PGs, no autoscaler resizing them.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
# Tests may remove the pools they create.
mon_allow_pool_delete = true
# Commit map changes after 0.1 s instead of 1 s: start does a dozen of them one after another.
paxos_propose_interval = 0.1
# A fresh cluster has no old clients: turn insecure reclaim off instead of warning about it.
auth_allow_insecure_global_id_reclaim = false
# The host's disk fill is not this cluster's health.
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[client]
keyring = $dir/keyring

[mon]
# Only the always-on mgr modules (a monitor setting: it writes the first MgrMap).
mgr_initial_modules =
mon_data = $dir/mon/\$cluster-\$id
log_file = $dir/log/\$cluster-\$name.log

[mgr]
# PG states reach the mgr every second instead of every 5 s: start waits for active+clean.
mgr_stats_period = 1
mgr_data = $dir/mgr/\$cluster-\$id
log_file = $dir/log/\$cluster-\$name.log

[osd]
osd_data = $dir/osd/\$cluster-\$id
log_file = $dir/log/\$cluster-\$name.log
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = ${CEPH_CLUSTER_OSD_SIZE:-4G}
bluestore_block_db_create = false
bluestore_block_wal_create = false
osd_memory_target = 1G
EOF

    # Keys: admin for clients, mgr.x; the monitor imports every key of its mkfs keyring.
    # Keyrings are written here: ceph-authtool -n mon. would create log files named after it.
    local k_mon k_admin k_mgr
    k_mon=$(ceph-authtool --gen-print-key) k_admin=$(ceph-authtool --gen-print-key)
    k_mgr=$(ceph-authtool --gen-print-key)
    (
        umask 077
        keyring client.admin "$k_admin" mon 'allow *' osd 'allow *' mgr 'allow *' mds 'allow *' \
            >"$dir/keyring"
        keyring mgr.x "$k_mgr" mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            >"$dir/mgr/ceph-x/keyring"
        { keyring mon. "$k_mon" mon 'allow *'; cat "$dir/keyring" "$dir/mgr/ceph-x/keyring"; } \
            >"$dir/mkfs.keyring"
    )
    monmaptool --create --fsid "$fsid" --enable-all-features --set-min-mon-release 16 \
        --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" "$dir/monmap" >/dev/null
    failed_on=mon.a
    ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mkfs.keyring" \
        >"$dir/log/mon.a.mkfs.out" 2>&1 || fail "mon.a mkfs failed"
    rm -f "$dir/monmap" "$dir/mkfs.keyring"

    launch mon.a ceph-mon -c "$CEPH_CONF" -f -i a
    wait_for 30 "ss -Htln 'sport = :$port' | grep -q ." mon.a
    exec 9<&-
    say "mon.a on 127.0.0.1:$port (v2), :$((port + 1)) (v1)"
    launch mgr.x ceph-mgr -c "$CEPH_CONF" -f -i x

    # The OSD: id and key from the monitor, then bluestore mkfs on a sparse file in DIR.
    local uuid key id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    id=$(echo "{\"cephx_secret\": \"$key\"}" | ceph_ osd new "$uuid" -i -)
    [ "$id" = 0 ] || fail "expected osd id 0, monitor gave '$id'"
    (umask 077; keyring osd.0 "$key" >"$dir/osd/ceph-0/keyring")
    # bluestore mkfs (~2 s) while the monitor creates the pool; the pool needs no OSD yet.
    failed_on=osd.0
    ceph-osd -c "$CEPH_CONF" -i 0 --mkfs --osd-uuid "$uuid" \
        </dev/null >"$dir/log/osd.0.mkfs.out" 2>&1 &
    mkfs_pid=$!
    failed_on=mon.a
    quiet ceph_ osd pool create "$pool" 16 16 replicated
    quiet ceph_ osd pool set "$pool" size 1 --yes-i-really-mean-it
    quiet ceph_ osd pool set "$pool" min_size 1
    wait "$mkfs_pid" || { mkfs_pid=""; fail "osd.0 mkfs failed" osd.0; }
    mkfs_pid=""
    launch osd.0 ceph-osd -c "$CEPH_CONF" -f -i 0
    say "osd.0 and mgr.x started"

    wait_for 60 osd_up_in osd.0
    timeout 60 rbd pool init "$pool" || fail "rbd pool init $pool failed"
    say "pool $pool ready"

    # Then HEALTH_OK with every PG active+clean (needs mgr.x: it reports PG states).
    local end=$((SECONDS + 60)) missing name
    failed_on=mgr.x
    while missing=$(status_missing); [ -n "$missing" ]; do
        for name in "${daemons[@]}"; do
            daemon_pid "$name" >/dev/null || fail "$name exited" "$name"
        done
        [ $SECONDS -lt $end ] || fail "not ready after 60 s: $missing"
        sleep 0.5
    done
    started=1
    trap - EXIT
    say "HEALTH_OK after $((SECONDS - t0)) s; eval \"\$($script env $dir)\""
}

case ${1:-} in
start) [ $# -eq 2 ] || usage; cmd_start "$2" ;;
stop) [ $# -eq 2 ] || usage; dir=$(absdir "$2"); cmd_stop ;;
env) [ $# -eq 2 ] || usage; dir=$(absdir "$2"); printf 'export CEPH_CONF=%q\n' "$dir/ceph.conf" ;;
*) usage ;;
esac
