# Sourced by scripts/bench.sh and scripts/bench-network.sh: starts the simulated host they
# measure, for $bin (release binaries) and $dir (the simulator's directory), and sets $daemon.
# blkback-server runs in a session of its own: under autogroup scheduling (Debian's default)
# a session is a scheduling group, as blkback-server.service's cgroup is under systemd. In
# the script's session, the simulated guest and the store's server (which on a real host are
# another domain and another service) would take their CPU time from the daemon's group: on
# this 2-core VM 4k NBD reads then measured 21-30k IOPS instead of 36-47k.
start_simulated_host() {
    "$bin/xensim" run --dir "$dir" --detach >/dev/null
    setsid "$bin/blkback-server" --sim "$dir" --log-level warning 2>"$dir/daemon.log" </dev/null &
    daemon=$!
    "$bin/xensim" domain create --dir "$dir" --domid 1 --memory-mb 256
}
