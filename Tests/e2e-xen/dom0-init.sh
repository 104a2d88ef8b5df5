#!/bin/bash
# Runs in dom0 (started as PID 1 by /sbin/e2e-init from the cached root image; this file and
# everything else of one run come from the payload disk mounted at /e2e). Starts the Xen
# services, runs the same guest workloads on kernel blkback, QEMU qdisk and blkback-server,
# prints everything the host needs as "E2E-..." lines on the console, then powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
E2E=/e2e
. $E2E/config   # SECONDS_EACH, BACKENDS, ROUNDS
LOG=/var/log/e2e; mkdir -p $LOG
say() { echo "E2E-DOM0 $*"; }
# Wait up to $2 seconds for the test "$1" to hold.
wait_for() { local i=0; while ! eval "$1"; do i=$((i+1)); [ $i -gt $(($2*2)) ] && return 1; sleep 0.5; done; }

say "phase=init uptime=$(cut -d' ' -f1 /proc/uptime)"
# PID 1 here is a script, not an init system: nothing brings loopback up (the API listens there).
ip link set lo up
modprobe xenfs && mount -t xenfs xenfs /proc/xen
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd loop; do modprobe $m; done
# Kernel blkback is loaded only for its own run, never behind our daemon's back.
echo "blacklist xen-blkback" > /etc/modprobe.d/e2e-no-kernel-blkback.conf
mkdir -p /var/log/xen/console /run/xen
# Guests' consoles go to files, which run_guest copies to ours.
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> /etc/default/xen
/etc/init.d/xen start >$LOG/xen-start.log 2>&1 || { say "xen start failed"; cat $LOG/xen-start.log; }
say "phase=xen-up uptime=$(cut -d' ' -f1 /proc/uptime) xenstored=$(ls /run/xenstored/socket 2>&1)"
xl info | grep -E '^(xen_version|total_memory|free_memory|nr_cpus)' | sed 's/^/E2E-DOM0 xl-info /'

KERNEL=$(ls /boot/vmlinuz-* | head -1)
# Copies a log file to our console, each line prefixed with [name]; unfollow name ends it.
follow() { # file name
    ( tail -n +1 -F "$1" 2>/dev/null & echo $! > /tmp/follow-$2.pid; wait ) | sed -u "s/^/[$2] /" &
}
unfollow() { sleep 1; kill "$(cat /tmp/follow-$1.pid)" 2>/dev/null; }

# What the frontend wrote and what the backend offered, from dom0's xenstore.
print_negotiated() { # backend domid kind
    local fe=/local/domain/$2/device/vbd/51712 be
    be=$(xenstore-read $fe/backend 2>/dev/null)
    local line="E2E-NEGOTIATED backend=$1"
    for k in protocol ring-page-order multi-queue-num-queues feature-persistent; do
        line+=" fe.$k=$(xenstore-read $fe/$k 2>/dev/null || echo -)"
    done
    for k in feature-max-indirect-segments max-ring-page-order multi-queue-max-queues feature-persistent feature-flush-cache feature-discard feature-barrier sector-size sectors; do
        line+=" be.$k=$(xenstore-read $be/$k 2>/dev/null || echo -)"
    done
    echo "$line"
    xenstore-ls -f $fe 2>/dev/null | sed "s/^/E2E-XS backend=$1 /"
    xenstore-ls -f $be 2>/dev/null | sed "s/^/E2E-XS backend=$1 /"
}

api() { curl -sS -m 10 "$@"; }

# One guest: create, watch its console for the steps that need dom0, wait until it is gone.
# disks is xl's list of disk specs, each quoted; mode full runs every check, perf only the
# verified write and the timed workloads; blkfront is the guest's xen-blkfront parameters
# (key:value,...).
run_guest() { # label disks hotplug force mode blkfront
    local b=$1 name=e2e-$1 domid t0=$(date +%s)
    cat > /tmp/$name.cfg <<CFG
name = "$name"
type = "pv"
kernel = "$KERNEL"
ramdisk = "$E2E/guest.cpio"
extra = "console=hvc0 quiet e2e_backend=$b e2e_seconds=$SECONDS_EACH e2e_hotplug=$3 e2e_force=$4 e2e_mode=$5 e2e_blkfront=$6"
memory = 768
vcpus = 2
disk = [ $2 ]
on_poweroff = "destroy"
CFG
    : > /var/log/xen/console/guest-$name.log
    follow /var/log/xen/console/guest-$name.log $name
    if ! xl create /tmp/$name.cfg >$LOG/xl-create-$b.log 2>&1; then
        say "backend=$b xl-create failed"; sed "s/^/E2E-DOM0 xl: /" $LOG/xl-create-$b.log
        echo "E2E-RESULT backend=$b test=attach ok=0 reason=xl-create-failed"
        unfollow $name; return 1
    fi
    domid=$(xl domid $name)
    say "backend=$b domid=$domid created in $(( $(date +%s) - t0 )) s"
    local fe=/local/domain/$domid/device/vbd/51712
    if wait_for "[ \"\$(xenstore-read \$(xenstore-read $fe/backend)/state 2>/dev/null)\" = 4 ]" 120; then
        print_negotiated $b $domid
    else
        say "backend=$b backend never reached Connected"
    fi
    local con=/var/log/xen/console/guest-$name.log
    local api_ok=0
    if [ "${b%%-*}" = ours ] && api -f http://127.0.0.1:8080/healthz >/dev/null 2>&1; then
        api_ok=1
        api http://127.0.0.1:8080/v1/vbds/$domid/51712 | sed "s/^/E2E-API backend=$b vbd: /"; echo
    fi
    if [ "$3" = 1 ]; then
        if wait_for "grep -q 'phase=await-xvdb' $con" $((SECONDS_EACH * 6 + 400)); then
            if [ $api_ok = 1 ]; then check_api_counters $domid $con; fi
            xl block-attach $name "phy:$(hot_disk),xvdb,w" >$LOG/block-attach.log 2>&1 \
                && say "backend=$b block-attach rc=0" || { say "backend=$b block-attach failed"; cat $LOG/block-attach.log; }
            xenstore-ls -f /local/domain/0/backend/vbd/$domid/51728 2>/dev/null | sed "s/^/E2E-XS backend=$b-hot /"
            if wait_for "grep -q 'phase=await-xvdb-gone' $con" 300; then
                xl block-detach $name xvdb >$LOG/block-detach.log 2>&1 \
                    && say "backend=$b block-detach rc=0" || { say "backend=$b block-detach failed"; cat $LOG/block-detach.log; }
            fi
        fi
    fi
    if [ -n "$RESIZE_FILE" ] && wait_for "grep -q 'phase=workloads' $con" 300; then
        # Grow the disk under the running workloads; blkback-server notices within a second.
        sleep 10
        truncate -s 1536M "$RESIZE_FILE" && losetup -c "$RESIZE_LOOP" && say "backend=$b grew xvda to 1536 MiB"
    fi
    if [ "$5" = beside ] && wait_for "grep -q 'phase=beside-verified' $con" $((SECONDS_EACH * 6 + 400)); then
        check_beside $domid
    fi
    if [ "$5" = restart ] && wait_for "grep -q 'phase=restart-window' $con" 300; then
        restart_under_guest $domid $con
    fi
    if [ "$4" = 1 ] && wait_for "grep -q 'phase=await-force' $con" 300; then
        local code
        code=$(api -o $LOG/force.json -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
            -d '{"state":"closing"}' http://127.0.0.1:8080/v1/vbds/$domid/51712/state)
        say "backend=$b api-force-closing http=$code body=$(head -c 300 $LOG/force.json)"
    fi
    # The guest powers itself off; the toolstack then tears the devices down.
    if wait_for "! xl domid $name >/dev/null 2>&1" $((SECONDS_EACH * 6 + 500)); then
        say "backend=$b guest gone after $(( $(date +%s) - t0 )) s"
    else
        say "backend=$b guest still running; destroying it"; xl destroy $name
        echo "E2E-RESULT backend=$b test=shutdown ok=0 reason=timeout"
    fi
    unfollow $name
    local left
    left=$( (xenstore-ls /local/domain/0/backend/vbd/$domid; xenstore-ls /local/domain/0/backend/vbd3/$domid) 2>/dev/null | wc -l)
    echo "E2E-RESULT backend=$b test=clean-close ok=$([ "$left" = 0 ] && echo 1 || echo 0) backend_nodes_left=$left"
    grep -iE 'error|timed out|fail' /var/log/xen/xl-$name.log 2>/dev/null | head -20 | sed "s/^/E2E-DOM0 xl-log backend=$b: /"
}

# Counters from the API against the guest's own /sys/block/xvda/stat (printed before await-xvdb).
check_api_counters() { # domid console-log
    local stat rd wr got_rd got_wr
    api http://127.0.0.1:8080/v1/vbds | sed 's/^/E2E-API vbds: /'; echo
    api http://127.0.0.1:8080/v1/vbds/$1/51712/stats > $LOG/stats.json
    sed 's/^/E2E-API stats: /' $LOG/stats.json; echo
    stat=$(grep -o 'phase=xvda-done stat=[^ ]*' $2 | tail -1 | sed 's/.*stat=//')
    rd=$(echo "$stat" | sed 's/.*rd=\([0-9]*\).*/\1/'); wr=$(echo "$stat" | sed 's/.*wr=\([0-9]*\).*/\1/')
    # A write that carries a flush travels as FLUSH_DISKCACHE with data, which blkback counts in
    # f_req (as the kernel's does), so the guest's writes are wr_req + f_req less pure flushes.
    got_rd=$(jq -r .rd_req $LOG/stats.json); got_wr=$(jq -r '.wr_req + .f_req' $LOG/stats.json)
    fl=$(echo "$stat" | sed 's/.*fl=\([0-9]*\).*/\1/')
    # blkfront sends one ring request per block request: the counts agree up to the few
    # requests in flight or issued while the guest printed its numbers.
    local ok=0
    if [ -n "$rd" ] && [ -n "$got_rd" ] && [ "$got_rd" != null ] \
       && [ $(( got_rd - rd )) -ge -16 ] && [ $(( got_rd - rd )) -le $(( rd / 20 + 64 )) ] \
       && [ $(( got_wr - wr )) -ge -16 ] && [ $(( got_wr - wr )) -le $(( wr / 20 + 64 + ${fl:-0} )) ]; then ok=1; fi
    echo "E2E-RESULT backend=ours test=api-counters ok=$ok guest_rd=$rd api_rd_req=$got_rd guest_wr=$wr guest_fl=$fl api_wr_plus_f_req=$got_wr"
}

# The hot-plugged disk: a loop device with 4096-byte sectors over the spare virtio disk.
hot_disk() {
    [ -n "$HOT_LOOP" ] || HOT_LOOP=$(losetup --find --show --sector-size 4096 "$HOTPLUG_DEVICE")
    echo "$HOT_LOOP"
}

start_daemon() {
    /e2e/blkback-server --kind ${DAEMON_KIND:-vbd} --listen 127.0.0.1:8080 --log-level $LOG_LEVEL >>$LOG/blkback-server.log 2>&1 &
    DAEMON=$!
    wait_for "api -f http://127.0.0.1:8080/healthz >/dev/null 2>&1 || ! kill -0 $DAEMON 2>/dev/null" 60
}

# While the guest's fio writes and verifies: SIGKILL three times, then an upgrade (SIGTERM and
# a new daemon), each a few seconds apart; the API's counters must go on after each.
restart_under_guest() { # domid console-log
    local n=0 sig t0 t1 before after
    for sig in KILL KILL KILL TERM; do
        sleep 6
        grep -q 'phase=restart-done' $2 && break
        n=$((n + 1))
        before=$(api http://127.0.0.1:8080/v1/vbds/$1/51712/stats | jq -r '.rd_req + .wr_req' 2>/dev/null)
        t0=$(date +%s.%N)
        kill -$sig $DAEMON; wait $DAEMON 2>/dev/null
        start_daemon
        t1=$(date +%s.%N)
        sleep 3
        after=$(api http://127.0.0.1:8080/v1/vbds/$1/51712/stats | jq -r '.rd_req + .wr_req' 2>/dev/null)
        say "restart $n sig=$sig api_back_after=$(awk -v a=$t0 -v b=$t1 'BEGIN { printf "%.2f", b - a }')s requests_before=$before requests_since=$after"
        echo "E2E-RESULT backend=ours-restart test=restart-$n-$sig ok=$([ "${after:-0}" -gt 0 ] 2>/dev/null && echo 1 || echo 0) requests_since=$after"
    done
    grep -a 'took the ring over\|taking over' $LOG/blkback-server.log | tail -8 | sed 's/^/E2E-DOM0 takeover: /'
    # What dom0's kernel said meanwhile (gntdev warnings would show here).
    dmesg | tail -60 | sed 's/^/E2E-DOM0 dmesg: /'
}

# blkback-server around one guest: started before it, stopped (SIGTERM) after it.
run_ours() { # label hotplug force mode blkfront
    if lsmod | grep -q '^xen_blkback'; then modprobe -r xen-blkback; fi
    start_daemon
    kill -0 $DAEMON 2>/dev/null || { say "blkback-server exited at start"; cat $LOG/blkback-server.log; }
    local force=$3
    if api -f http://127.0.0.1:8080/healthz >/dev/null 2>&1; then say "api=available"
    else force=0; say "api=unavailable"; echo "E2E-RESULT backend=$1 test=api-counters skipped=1 reason=no-http-api"
         echo "E2E-RESULT backend=$1 test=api-forced-close skipped=1 reason=no-http-api"; fi
    follow $LOG/blkback-server.log blkback-server
    run_guest $1 "'phy:$DATA_DISK,xvda,w'" $2 $force $4 $5
    if kill -0 $DAEMON 2>/dev/null; then
        kill -TERM $DAEMON; t=0; while kill -0 $DAEMON 2>/dev/null && [ $t -lt 20 ]; do sleep 0.5; t=$((t+1)); done
        wait $DAEMON; rc=$?
        echo "E2E-RESULT backend=$1 test=daemon-stop ok=$([ $rc = 0 ] && echo 1 || echo 0) exit=$rc"
    else
        wait $DAEMON; echo "E2E-RESULT backend=$1 test=daemon-alive ok=0 exit=$?"
    fi
    unfollow blkback-server
}

# Who serves each of the guest's two disks while it holds them: xvda kernel blkback (backend
# kind vbd), xvdb blkback-server (kind vbd3, through dist/block-blkback-server).
check_beside() { # domid
    local fe=/local/domain/$1/device/vbd be_a be_b kernel=0 ours=0 requests
    be_a=$(xenstore-read $fe/51712/backend 2>/dev/null); be_b=$(xenstore-read $fe/51728/backend 2>/dev/null)
    [ "$be_a" = /local/domain/0/backend/vbd/$1/51712 ] && [ -e /sys/bus/xen-backend/devices/vbd-$1-51712 ] && kernel=1
    echo "E2E-RESULT backend=beside test=beside-kernel-serves-xvda ok=$kernel backend_path=$be_a module=$(lsmod | grep -c '^xen_blkback')"
    api "http://127.0.0.1:8080/v1/vbds?kind=vbd3" | sed 's/^/E2E-API beside vbds: /'; echo
    requests=$(api http://127.0.0.1:8080/v1/vbds/$1/51728/stats | jq -r '.rd_req + .wr_req' 2>/dev/null)
    [ "$be_b" = /local/domain/0/backend/vbd3/$1/51728 ] && [ "${requests:-0}" -gt 0 ] 2>/dev/null && ours=1
    echo "E2E-RESULT backend=beside test=beside-ours-serves-xvdb ok=$ours backend_path=$be_b requests=${requests:-none}"
    xenstore-ls -f /local/domain/0/backend/vbd3/$1 2>/dev/null | sed 's/^/E2E-XS backend=beside /'
}

# One guest with a disk on kernel blkback and one on blkback-server (xl's backendtype=tap,
# which libxl writes under backend/vbd3 from Xen 4.19 on; 4.17 refuses it).
run_beside() {
    local version
    version=$(xl info | awk '/^xen_version/ {print $3}')
    case $version in 4.1[0-8].*|4.[0-9].*)
        echo "E2E-RESULT backend=beside test=beside skipped=1 reason=xen-$version-has-no-backendtype-tap"; return ;;
    esac
    install -m 755 $E2E/block-blkback-server /etc/xen/scripts/block-blkback-server
    truncate -s 256M /var/tmp/e2e-beside.img
    modprobe xen-blkback && say "xen-blkback loaded beside blkback-server"
    DAEMON_KIND=vbd3 start_daemon
    follow $LOG/blkback-server.log blkback-server
    run_guest beside "'phy:$DATA_DISK,xvda,w', 'format=raw,vdev=xvdb,access=rw,backendtype=tap,script=block-blkback-server,target=/var/tmp/e2e-beside.img'" 0 0 beside -
    kill -INT $DAEMON; wait $DAEMON
    unfollow blkback-server
    echo "E2E-RESULT backend=beside test=loop-detached ok=$(losetup -j /var/tmp/e2e-beside.img | grep -c . | sed 's/^0$/1/;t;s/.*/0/')"
    modprobe -r xen-blkback && say "xen-blkback unloaded"
}

# One guest on backend b: every check in the first round, the timed workloads after.
run_backend() { # backend mode
    case $1 in
    kernel)
        modprobe xen-blkback && say "xen-blkback loaded"
        run_guest kernel "'phy:$DATA_DISK,xvda,w'" 0 0 $2 -
        modprobe -r xen-blkback && say "xen-blkback unloaded" || say "xen-blkback unload failed"
        ;;
    qdisk)
        run_guest qdisk "'format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=$DATA_DISK'" 0 0 $2 -
        ;;
    ours)
        if [ $2 = full ]; then run_ours ours 1 1 full -; else run_ours ours 0 0 perf -; fi
        ;;
    esac
}

# Rounds alternate the backends, so that the medians of each workload share the machine's
# moods; then blkback-server once more with a multi-page, multi-queue guest.
for round in $(seq 1 $ROUNDS); do
    say "phase=round-$round"
    for b in $BACKENDS; do run_backend $b $([ $round = 1 ] && echo full || echo perf); done
done
case " $BACKENDS " in *" ours "*)
    # This guest's disk is a loop device over a file, which dom0 grows during its workloads.
    RESIZE_FILE=/var/tmp/e2e-resize.img; truncate -s 1G $RESIZE_FILE
    RESIZE_LOOP=$(losetup --find --show --direct-io=on $RESIZE_FILE)
    DATA_DISK_SAVED=$DATA_DISK; DATA_DISK=$RESIZE_LOOP
    run_ours ours-order4 0 0 full max_ring_page_order:4,max_queues:2
    DATA_DISK=$DATA_DISK_SAVED; RESIZE_FILE=""
    losetup -d $RESIZE_LOOP
    run_ours ours-restart 0 0 restart -
    run_beside ;;
esac
say "phase=done uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
echo o > /proc/sysrq-trigger
sleep 60
