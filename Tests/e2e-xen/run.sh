#!/bin/bash
# End-to-end rig on real Xen: Xen + a Debian dom0 under QEMU (TCG), PV guests with the
# unmodified Linux xen-blkfront, the same workloads on kernel blkback, QEMU qdisk and
# blkback-server. See README.md ("Real Xen end-to-end rig"). Needs root (apt, debootstrap).
#
# Environment: E2E_RELEASE (the Debian release of dom0 and guests: bookworm = Xen 4.17 and
# Linux 6.1, the default; trixie = Xen 4.20 and Linux 6.12), E2E_CACHE (default /var/tmp/blkback-e2e), E2E_TIMEOUT (QEMU wall clock, s,
# default 2400), E2E_SECONDS (per fio job, default 10), E2E_BACKENDS (default
# "kernel qdisk ours"), E2E_ROUNDS (rounds of timed workloads, default 3), E2E_LOG_LEVEL (blkback-server, default info), E2E_SKIP_BUILD=1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
RELEASE=${E2E_RELEASE:-bookworm}
CACHE=${E2E_CACHE:-/var/tmp/blkback-e2e}
TIMEOUT=${E2E_TIMEOUT:-2400}
SECONDS_EACH=${E2E_SECONDS:-10}
BACKENDS=${E2E_BACKENDS:-kernel qdisk ours}
ROUNDS=${E2E_ROUNDS:-3}
LOG_LEVEL=${E2E_LOG_LEVEL:-info}
RUN=$CACHE/run
start=$(date +%s)
log() { echo "e2e-xen: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, debootstrap, chroot)"
[ -f "$here/packages-$RELEASE.txt" ] || die "E2E_RELEASE=$RELEASE: no $here/packages-$RELEASE.txt (bookworm or trixie)"

# 1. Host tools (idempotent).
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v mkfs.ext4 >/dev/null || ! command -v cpio >/dev/null; then
    log "installing qemu-system-x86 debootstrap e2fsprogs cpio"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 debootstrap e2fsprogs cpio >/dev/null
fi

# 2. The daemon, static Swift stdlib, in its own scratch path.
bin=$repo/.build-e2e/release/blkback-server
if [ "${E2E_SKIP_BUILD:-0}" != 1 ]; then
    log "building blkback-server (release, static stdlib)"
    (cd "$repo" && swift build -c release -Xswiftc -static-stdlib --product blkback-server --scratch-path .build-e2e 2>&1 | tail -3)
fi
[ -x "$bin" ] || die "no $bin; build failed"

# 3. Dom0 root filesystem, cached on its inputs.
mkdir -p "$CACHE"
key=$RELEASE-$(cat "$here/packages-$RELEASE.txt" "$here/build-rootfs.sh" | sha256sum | cut -c1-16)
rootfs=$CACHE/rootfs-$key
if [ ! -d "$rootfs" ]; then
    log "debootstrap of the $RELEASE dom0 root filesystem into $rootfs (once; ~3 min)"
    rm -rf "$CACHE"/rootfs-"$RELEASE"-* "$CACHE"/root-"$RELEASE"-*.img   # stale caches of other inputs
    "$here/build-rootfs.sh" "$rootfs" "$RELEASE" > "$CACHE/debootstrap-$key.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap-$key.log"
fi
imgkey=$(cat "$here/e2e-init" | sha256sum | cut -c1-8)
rootimg=$CACHE/root-$key-$imgkey.img
if [ ! -f "$rootimg" ]; then
    log "making the dom0 root image $rootimg"
    rm -f "$CACHE"/root-"$RELEASE"-*.img
    install -m 755 "$here/e2e-init" "$rootfs/sbin/e2e-init"
    rm -f "$rootimg.tmp" && truncate -s 4G "$rootimg.tmp"
    mkfs.ext4 -q -F -d "$rootfs" "$rootimg.tmp" && mv "$rootimg.tmp" "$rootimg"
fi
kver=$(ls "$rootfs/lib/modules" | head -1)

# 4. This run's payload disk: daemon, dom0 script, guest initramfs.
rm -rf "$RUN" && mkdir -p "$RUN/payload" "$RUN/guest"
strip -o "$RUN/payload/blkback-server" "$bin"
install -m 755 "$here/dom0-init.sh" "$RUN/payload/dom0-init.sh"
install -m 755 "$repo/dist/block-blkback-server" "$RUN/payload/block-blkback-server"
cat > "$RUN/payload/config" <<CFG
SECONDS_EACH=$SECONDS_EACH
BACKENDS="$BACKENDS"
ROUNDS=$ROUNDS
LOG_LEVEL=$LOG_LEVEL
DATA_DISK=/dev/vdc
HOTPLUG_DEVICE=/dev/vdd
CFG
g=$RUN/guest
mkdir -p "$g"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$rootfs/bin/busybox" "$g/bin/busybox"
for a in $(chroot "$rootfs" /bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$g/bin/$a"; done
# fio and the libraries it links, from the same Debian packages.
cp "$rootfs/usr/bin/fio" "$g/bin/fio"
for lib in $(chroot "$rootfs" ldd /usr/bin/fio | grep -o '/[^ ]*'); do
    mkdir -p "$g$(dirname "$lib")" && cp -L "$rootfs$lib" "$g$lib"
done
ko=$(find "$rootfs/lib/modules/$kver" -name 'xen-blkfront.ko*')
case $ko in
    *.xz) xz -dc "$ko" > "$g/lib/modules/xen-blkfront.ko" ;;
    *) cp "$ko" "$g/lib/modules/xen-blkfront.ko" ;;
esac
install -m 755 "$here/guest-init.sh" "$g/init"
(cd "$g" && find . | cpio -o -H newc --quiet) > "$RUN/payload/guest.cpio"
size=$(( $(du -sm "$RUN/payload" | cut -f1) + 32 ))
truncate -s ${size}M "$RUN/payload.img"
mkfs.ext4 -q -F -d "$RUN/payload" "$RUN/payload.img"
truncate -s 1G "$RUN/data.img"
truncate -s 256M "$RUN/hot.img"
zcat "$rootfs"/boot/xen-*.gz > "$RUN/xen"

# 5. Boot Xen + dom0; QEMU is ended by its pid whatever happens.
qpid=""
follower=""
cleanup() {
    [ -n "$follower" ] && kill "$follower" 2>/dev/null || true
    if [ -f "$RUN/qemu.pid" ]; then
        qpid=$(cat "$RUN/qemu.pid" 2>/dev/null || true)
        [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM
serial=$RUN/serial.log
: > "$serial"
log "booting Xen + dom0 under QEMU (TCG); serial console: $serial; timeout ${TIMEOUT}s"
boot() {
    : > "$serial"; rm -f "$RUN/qemu.pid"
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu qemu64 -m 6144 -smp 2 \
        -machine q35 -nographic -no-reboot -pidfile "$RUN/qemu.pid" \
        -kernel "$RUN/xen" \
        -append "console=com1 com1=115200,8n1 dom0_mem=2048M,max:2048M dom0_max_vcpus=2 noreboot" \
        -initrd "$rootfs/boot/vmlinuz-$kver root=/dev/vda rw console=hvc0 earlyprintk=xen init=/sbin/e2e-init,$rootfs/boot/initrd.img-$kver" \
        -drive file="$rootimg",if=virtio,format=raw,snapshot=on,cache=unsafe \
        -drive file="$RUN/payload.img",if=virtio,format=raw,readonly=on \
        -drive file="$RUN/data.img",if=virtio,format=raw,cache=none,aio=native \
        -drive file="$RUN/hot.img",if=virtio,format=raw,cache=none,aio=native \
        -serial file:"$serial" -monitor none </dev/null >"$RUN/qemu.out" 2>&1 &
    local tpid=$! last=-1 quiet=0 size
    # Progress on our stdout: the markers, the daemon's log and our guest's console.
    sleep 2
    tail -n +1 -F --pid=$tpid "$serial" 2>/dev/null | grep --line-buffered -aE 'E2E-|\[blkback-server\]|\[e2e-ours\]|Kernel panic|BUG:|Oops' &
    follower=$!
    # Watchdog: a console silent for E2E_STALL seconds means a hang (TCG occasionally hangs
    # early in dom0's boot); QEMU is then ended by its pid.
    while kill -0 $tpid 2>/dev/null; do
        sleep 5
        size=$(stat -c %s "$serial")
        if [ "$size" = "$last" ]; then quiet=$((quiet + 5)); else quiet=0; last=$size; fi
        if [ $quiet -ge "${E2E_STALL:-240}" ]; then
            log "console silent for ${quiet}s; stopping QEMU"
            kill "$(cat "$RUN/qemu.pid")" 2>/dev/null
            wait $tpid; kill $follower 2>/dev/null; follower=""; return 2
        fi
    done
    wait $tpid; local rc=$?
    kill $follower 2>/dev/null; follower=""
    return $rc
}
for attempt in 1 2; do
    set +e; boot; qrc=$?; set -e
    grep -aq 'E2E-DOM0 phase=init' "$serial" && break
    log "dom0 never started (attempt $attempt, QEMU exit $qrc)"
done
sleep 1
log "QEMU exited with $qrc after $(( $(date +%s) - start )) s (whole run)"

# 6. Report.
exec "$here/report.sh" "$serial"
