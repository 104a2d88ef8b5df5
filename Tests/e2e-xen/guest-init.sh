#!/bin/sh
# PID 1 of the PV guest (busybox initramfs with xen-blkfront.ko and fio). Runs the workloads
# on /dev/xvda, optionally the hot-plug and forced-close steps, prints one
# "E2E-RESULT backend=B test=T key=value..." line per result, then powers the guest off so
# the toolstack closes the devices the normal way (no xl destroy).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp

arg() { sed -n "s/.*\<$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
B=$(arg e2e_backend); SECONDS_EACH=$(arg e2e_seconds); HOTPLUG=$(arg e2e_hotplug); FORCE=$(arg e2e_force)
# e2e_mode=perf: only the verified write and the four timed workloads (a later round).
# e2e_blkfront=key:value,...: xen-blkfront module parameters (max_ring_page_order, max_queues).
MODE=$(arg e2e_mode); BLKFRONT=$(arg e2e_blkfront | tr ',:' ' =')
: "${B:=unknown}" "${SECONDS_EACH:=10}" "${HOTPLUG:=0}" "${FORCE:=0}" "${MODE:=full}"
say() { echo "E2E-GUEST backend=$B $*"; }
result() { echo "E2E-RESULT backend=$B $*"; }
finish() { say "phase=poweroff"; sync; poweroff -f; sleep 30; }

# Wait up to $2 seconds for the test "$1" to hold.
wait_for() { i=0; while ! eval "$1"; do i=$((i+1)); [ $i -gt $(($2*2)) ] && return 1; sleep 0.5; done; }

# Pattern write + direct read back: the backend must return exactly what was written.
verify_pattern() { # device MiB label
    say "step=$3"
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=$2 2>/dev/null
    want=$(sha256sum /tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of=$1 bs=1M count=$2 conv=fsync 2>/dev/null; wrc=$?
    echo 3 > /proc/sys/vm/drop_caches
    got=$(dd if=$1 bs=1M count=$2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    rm -f /tmp/pattern
    if [ $wrc -eq 0 ] && [ "$want" = "$got" ]; then result "test=$3 ok=1 mib=$2 sha256=$got"
    else result "test=$3 ok=0 mib=$2 want=$want got=$got write_rc=$wrc"; fi
}

# One fio job; prints iops and MiB/s of the direction it measures (terse v3 fields).
run_fio() { # test rw bs iodepth [extra fio args...]
    t=$1; rw=$2; bs=$3; qd=$4; shift 4
    say "step=$t"
    out=$(fio --name=$t --filename=/dev/xvda --direct=1 --ioengine=libaio --rw=$rw --bs=$bs \
        --iodepth=$qd --size=256M --runtime=$SECONDS_EACH --time_based --minimal "$@" 2>/tmp/fio.err)
    rc=$?
    case $rw in *read) f_bw=7; f_iops=8 ;; *) f_bw=48; f_iops=49 ;; esac
    err=$(echo "$out" | cut -d';' -f5)
    iops=$(echo "$out" | cut -d';' -f$f_iops | cut -d. -f1)
    mibs=$(echo "$out" | cut -d';' -f$f_bw | awk '{printf "%.1f", $1/1024}')
    if [ $rc -eq 0 ] && [ "$err" = 0 ]; then result "test=$t ok=1 iops=$iops mibs=$mibs"
    else result "test=$t ok=0 rc=$rc err=$err $(head -c 300 /tmp/fio.err | tr '\n' ' ')"; fi
}

say "phase=boot kernel=$(uname -r)"
# A hung disk must not hang the run: the guest gives up and powers off on its own.
( sleep $((SECONDS_EACH * 6 + 420))
  result "test=guest-watchdog ok=0 reason=guest-timed-out inflight=$(cat /sys/block/xvda/inflight | tr -s ' ' ,) stat=$(tr -s ' ' , < /sys/block/xvda/stat)"
  poweroff -f ) &
insmod /lib/modules/xen-blkfront.ko $BLKFRONT || say "insmod xen-blkfront $BLKFRONT failed"
if ! wait_for '[ -b /dev/xvda ]' 60; then result "test=attach ok=0 reason=no-xvda"; finish; fi
result "test=attach ok=1 sectors=$(cat /sys/block/xvda/size) write_cache=$(cat /sys/block/xvda/queue/write_cache | tr ' ' _) discard_max=$(cat /sys/block/xvda/queue/discard_max_bytes) max_segments=$(cat /sys/block/xvda/queue/max_segments) max_hw_kb=$(cat /sys/block/xvda/queue/max_hw_sectors_kb) nr_queues=$(ls /sys/block/xvda/mq | wc -l)"

if [ "$MODE" = restart ]; then
    # dom0 kills and restarts blkback-server while fio writes and verifies: nothing of it may
    # reach the guest as an error.
    say "phase=restart-window"
    run_fio restart-verify randwrite 4k 16 --size=192M --verify=crc32c --do_verify=1 --time_based=0 --runtime=0
    say "phase=restart-done"
    errors=$(dmesg | grep -ciE 'I/O error|blk_update_request|has not unmapped|disk dead|critical medium' || true)
    result "test=restart-dmesg ok=$([ "$errors" = 0 ] && echo 1 || echo 0) error_lines=$errors"
    dmesg | grep -iE 'I/O error|blk_update_request|has not unmapped|disk dead' | head -5 | sed "s/^/E2E-GUEST backend=$B dmesg: /"
    finish
fi
if [ "$MODE" = beside ]; then
    # xvda is served by kernel blkback, xvdb by blkback-server (backend kind vbd3): each
    # verifies alone, then both at once.
    if ! wait_for '[ -b /dev/xvdb ]' 60; then result "test=beside-attach ok=0 reason=no-xvdb"; finish; fi
    verify_pattern /dev/xvda 32 beside-kernel-checksum
    verify_pattern /dev/xvdb 32 beside-ours-checksum
    say "step=beside-fio-verify"
    out=$(fio --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 --size=64M \
        --verify=crc32c --do_verify=1 --minimal --name=kernel --filename=/dev/xvda \
        --name=ours --filename=/dev/xvdb 2>/tmp/fio.err)
    rc=$?
    errs=$(echo "$out" | cut -d';' -f5 | paste -sd, -)
    if [ $rc -eq 0 ] && [ "$errs" = "0,0" ]; then result "test=beside-fio-verify ok=1 jobs=2"
    else result "test=beside-fio-verify ok=0 rc=$rc err=$errs $(head -c 300 /tmp/fio.err | tr '\n' ' ')"; fi
    # dom0 looks at who serves each disk while the guest still holds them.
    say "phase=beside-verified"
    sleep 15
    finish
fi
[ "$MODE" = perf ] || verify_pattern /dev/xvda 32 checksum
size_before=$(cat /sys/block/xvda/size)
say "phase=workloads size=$size_before"
run_fio fio-verify randwrite 4k 32 --size=32M --verify=crc32c --do_verify=1 --time_based=0 --runtime=0
run_fio randread-4k randread 4k 32
run_fio randwrite-4k randwrite 4k 32
run_fio seqread-1m read 1M 8
run_fio seqwrite-1m write 1M 8
# Direct I/O with data checked by fio after the timed runs rewrote the disk.
run_fio fio-verify-1m write 1M 8 --size=64M --verify=crc32c --do_verify=1 --time_based=0 --runtime=0
if [ "$MODE" = perf ]; then finish; fi

# Where dom0 grows the disk during the workloads, the guest sees the new size without any
# I/O error (an online resize).
size_after=$(cat /sys/block/xvda/size)
if [ "$size_after" != "$size_before" ]; then
    result "test=online-resize ok=$([ "$size_after" -gt "$size_before" ] && echo 1 || echo 0) sectors_before=$size_before sectors_after=$size_after io_errors=$(dmesg | grep -c 'I/O error')"
fi
# No feature-discard from the backend: blkfront offers no discard, nothing to test.
if [ "$(cat /sys/block/xvda/queue/discard_max_bytes)" = 0 ]; then result "test=discard skipped=1 reason=backend-offers-no-discard"
elif blkdiscard -o 0 -l 16777216 /dev/xvda 2>/tmp/discard.err; then result "test=discard ok=1"
else result "test=discard ok=0 err=$(head -c 200 /tmp/discard.err | tr ' \n' '_ ')"; fi
run_fio flush write 4k 1 --size=1M --fsync=1 --time_based=0 --runtime=0
sync && result "test=sync ok=1"
# /sys/block/xvda/stat: reads, writes, discards, flushes completed (fields 1, 5, 12, 16).
say "phase=xvda-done stat=$(awk '{print "rd="$1",wr="$5",ds="$12",fl="$16",rd_sect="$3",wr_sect="$7}' /sys/block/xvda/stat)"

if [ "$HOTPLUG" = 1 ]; then
    say "phase=await-xvdb"
    if wait_for '[ -b /dev/xvdb ]' 120; then
        result "test=hot-attach ok=1 sectors=$(cat /sys/block/xvdb/size)"
        # dom0 attaches a loop device with 4096-byte sectors: a 4Kn disk.
        lbs=$(cat /sys/block/xvdb/queue/logical_block_size); pbs=$(cat /sys/block/xvdb/queue/physical_block_size)
        result "test=hot-4kn ok=$([ "$lbs" = 4096 ] && echo 1 || echo 0) logical_block_size=$lbs physical_block_size=$pbs"
        verify_pattern /dev/xvdb 8 hot-checksum
        say "phase=await-xvdb-gone"
        if wait_for '[ ! -e /sys/block/xvdb ]' 120; then result "test=hot-detach ok=1"
        else result "test=hot-detach ok=0 reason=xvdb-still-present"; fi
    else
        result "test=hot-attach ok=0 reason=no-xvdb"
    fi
fi

if [ "$FORCE" = 1 ]; then
    # The backend is forced to Closing through the API; blkfront follows and leaves Connected.
    # xenbus prints the state by name ("Connected"); compare without case.
    state() { tr 'A-Z' 'a-z' < /sys/bus/xen/devices/vbd-51712/state 2>/dev/null || echo gone; }
    before=$(state)
    say "phase=await-force state=$before"
    if [ "$before" = connected ] && wait_for '[ "$(state)" != connected ]' 90; then
        result "test=api-forced-close ok=1 frontend_state=$(state)"
    else
        result "test=api-forced-close ok=0 frontend_state=$(state)"
    fi
fi
finish
