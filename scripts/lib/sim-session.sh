# Sourced by the simulator measurement scripts (scale.sh, storm-check.sh): the binaries to run
# ($bin: BLKBACK_BIN_DIR or .build/debug), a work directory in /dev/shm named after $1, the
# pids to end ($pids, appended by the caller), a cleanup on exit that ends them by pid and
# stops the simulator, and a free loopback port ($port).
bin=${BLKBACK_BIN_DIR:-$PWD/.build/debug}
work=$(mktemp -d "/dev/shm/blkback-$1-XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    "$bin/xensim" stop --dir "$work" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
