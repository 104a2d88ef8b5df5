#!/usr/bin/env bash
# The API against its description: starts a simulator, blkback-server (with a bearer token)
# and a guest running a verified workload, runs schemathesis over openapi.yaml (every check,
# 0 failures and no 5xx allowed), then checks /metrics with Prometheus' own text parser
# against the stats endpoint and that the guest's workload survived the fuzzer's state
# changes. Everything it starts is ended by pid. Needs a built tree (swift build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${BLKBACK_BIN_DIR:-$root/.build/debug}
[ -x "$bin/blkback-server" ] && [ -x "$bin/xensim" ] || { echo "api-conformance: build first (swift build)" >&2; exit 2; }

# schemathesis 4 (its CLI and config format) and the Prometheus client's text parser, in a
# virtual environment of their own (Debian's python refuses system-wide pip installs).
venv=$root/.build/api-conformance-venv
if ! "$venv/bin/python" -c 'import schemathesis, prometheus_client, sys; sys.exit(0 if schemathesis.__version__.startswith("4.") else 1)' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q 'schemathesis>=4,<5' 'prometheus-client>=0.17'
fi
export PATH=$venv/bin:$PATH

work=$(mktemp -d /tmp/blkback-api-XXXXXX)
pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
    # A guest whose backend went away waits to reconnect: it gets 10 s, then SIGKILL.
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    "$bin/xensim" stop --dir "$work" >/dev/null 2>&1 || true
    if [ $status -ne 0 ]; then
        echo "--- daemon log (tail)"; tail -n 40 "$work/daemon.log" 2>/dev/null || true
        echo "--- guest log (tail)"; tail -n 20 "$work/guest.log" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT INT TERM
fail() { echo "api-conformance: $*" >&2; exit 1; }
# Sends SIGINT to one of our children and waits up to 30 s before SIGKILL; returns its status.
stop_child() {
    local pid=$1 deadline=$((SECONDS + 30))
    kill -INT "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    local status=0
    wait "$pid" 2>/dev/null || status=$?
    return $status
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
api="http://127.0.0.1:$port"
(umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$work/token")
token=$(cat "$work/token")
auth="Authorization: Bearer $token"

"$bin/xensim" run --dir "$work" --detach >/dev/null
truncate -s 64M "$work/disk.img"
"$bin/blkback-server" --sim "$work" --listen "127.0.0.1:$port" --token-file "$work/token" >"$work/daemon.log" 2>&1 &
pids+=($!)
"$bin/xensim" domain create --dir "$work" --domid 1
"$bin/xensim" attach --dir "$work" --domid 1 --devid 51712 --target "$work/disk.img"
"$bin/xensim" frontend --dir "$work" --domid 1 --devid 51712 --workload randrw --seconds 3600 \
    --reconnect-timeout 120 --json >"$work/guest.log" 2>"$work/guest.err" &
guest=$!
pids+=($guest)

vbd() { curl -sf -H "$auth" "$api/v1/vbds/1/51712"; }
state_of() { vbd | python3 -c 'import json,sys; print(json.load(sys.stdin)["backend_state"])'; }
# Every wait below is for an event; its deadline only ends a run whose event never comes.
wait_connected() {
    local deadline=$((SECONDS + 60))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(state_of 2>/dev/null)" = Connected ] && return 0
        sleep 0.2
    done
    fail "VBD 1/51712 did not reach Connected: $(vbd)"
}
wait_connected

echo "== schemathesis $(python3 -c 'import schemathesis; print(schemathesis.__version__)') against $api"
cat >"$work/schemathesis.toml" <<TOML
# 409 is a documented answer to a valid state command (e.g. closing a Closed VBD).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409"]
TOML
(cd "$work" && schemathesis --config-file "$work/schemathesis.toml" run "$root/openapi.yaml" --url "$api" \
    --header "$auth" --exclude-path /v1/events --checks all --workers 1 --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-100}" \
    --seed "${SCHEMATHESIS_SEED:-4242}" --no-color --report junit --report-junit-path "$work/junit.xml") \
    | tee "$work/schemathesis.out"
python3 - "$work/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
print(f"schemathesis: {tests} operations tested, {failures} failures")
sys.exit(1 if failures or tests == 0 else 0)
PY

echo "== /v1/events (a stream: not fuzzed above, which waits for whole bodies)"
# An event this run causes reaches a stream opened with the token; bad arguments are JSON 400s.
curl -sN -m 20 -H "$auth" "$api/v1/events?domid=1" >"$work/events.txt" 2>/dev/null &
reader=$!
pids+=($reader)
deadline=$((SECONDS + 30))
until grep -q '^retry:' "$work/events.txt" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "GET /v1/events sent nothing"
    sleep 0.1
done
curl -sf -o /dev/null -H "$auth" -X PUT -d '{"read_iops":123}' "$api/v1/vbds/1/51712/qos"
curl -sf -o /dev/null -H "$auth" -X PUT -d '{}' "$api/v1/vbds/1/51712/qos"
deadline=$((SECONDS + 30))
until grep -q '"read_iops":123' "$work/events.txt" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "no qos-changed event on the stream: $(cat "$work/events.txt")"
    sleep 0.1
done
kill "$reader" 2>/dev/null || true
grep -q '^event: qos-changed$' "$work/events.txt" || fail "the stream has no 'event: qos-changed' line"
for query in "domid=x" "kind=A" "since=1"; do
    code=$(curl -s -o "$work/events-bad.json" -w '%{http_code}' -H "$auth" "$api/v1/events?$query")
    [ "$code" = 400 ] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))["error"]' "$work/events-bad.json" \
        || fail "GET /v1/events?$query answered $code: $(cat "$work/events-bad.json")"
done
code=$(curl -s -o /dev/null -w '%{http_code}' "$api/v1/events")
[ "$code" = 401 ] || fail "GET /v1/events without the token answered $code, not 401"
echo "events: stream, filters and token checked"

echo "== a fresh guest after the fuzzer"
# The fuzzer's state commands may well have ended the first guest (a close during its
# renegotiation is fatal to it); what it did is reported, not judged.
stop_child "$guest" || true
pids=("${pids[@]/$guest}")
python3 - "$work/guest.log" <<'PY' 2>/dev/null || echo "first guest: no report (it did not end by itself)"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"first guest: {r['ops']} ops, {r['reconnects']} reconnects, verify failures {r['verify_failures']}, {r.get('error', 'no error')}")
PY
# Offer the device again if it is closed; a new guest resets whatever session the first
# one left behind, as blkfront does.
deadline=$((SECONDS + 60))
until [ "$(state_of)" = InitWait ]; do
    [ $SECONDS -lt $deadline ] || fail "VBD 1/51712 was not offered again: $(vbd)"
    curl -s -o /dev/null -H "$auth" -X POST -d '{"state":"reconnect"}' "$api/v1/vbds/1/51712/state"
    sleep 0.2
done
"$bin/xensim" frontend --dir "$work" --domid 1 --devid 51712 --workload randrw --seconds 3600 \
    --json >"$work/guest.log" 2>"$work/guest.err" &
guest=$!
pids+=($guest)
wait_connected

stats() { curl -sf -H "$auth" "$api/v1/vbds/1/51712/stats"; }
requests() { stats | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["rd_req"] + s["wr_req"])'; }
before=$(requests); deadline=$((SECONDS + 60))
until [ "$(requests)" -gt "$before" ]; do
    [ $SECONDS -lt $deadline ] || fail "counters do not grow with a running guest"
    sleep 0.1
done

echo "== /metrics parsed by prometheus_client equals /stats (guest paused)"
kill -STOP "$guest"
deadline=$((SECONDS + 60))
until [ "$(stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["inflight"])')" = 0 ]; do
    [ $SECONDS -lt $deadline ] || fail "requests stay in flight with the guest paused"
    sleep 0.05
done
curl -sf -H "$auth" "$api/metrics" >"$work/metrics.txt"
stats >"$work/stats.json"
kill -CONT "$guest"
python3 - "$work/metrics.txt" "$work/stats.json" <<'PY' || fail "metrics and stats disagree"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
stats = json.load(open(sys.argv[2]))
samples = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.labels.get("domid") == "1" and s.labels.get("devid") == "51712" and s.labels.get("kind") == "vbd":
            key = s.name if s.name != "blkback_request_duration_seconds_count" else s.name + ":" + s.labels["op"]
            if "le" not in s.labels:
                samples[key] = s.value
expected = {
    "blkback_reads_completed_total": stats["rd_req"],
    "blkback_writes_completed_total": stats["wr_req"],
    "blkback_read_bytes_total": stats["rd_sect"] * 512,
    "blkback_written_bytes_total": stats["wr_sect"] * 512,
    "blkback_flush_requests_total": stats["f_req"],
    "blkback_discards_completed_total": stats["ds_req"],
    "blkback_requests_out_of_resources_total": stats["oo_req"],
    "blkback_request_errors_total": stats["errors"],
    "blkback_io_now": stats["inflight"],
    "blkback_persistent_grants": stats["persistent_grants"],
    "blkback_grant_cap_copied_pages_total": stats["grant_cap_copied"],
    "blkback_spurious_events_total": stats["spurious_events"],
    "blkback_store_waiting_rings": stats["store_waiting_rings"],
    "blkback_store_reconnects_total": stats["store_reconnects"],
    "blkback_request_duration_seconds_count:read": stats["rd_req"],
    "blkback_request_duration_seconds_count:write": stats["wr_req"],
    "blkback_vbd_state": 4,
    "blkback_vbd_info": 1,
}
bad = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
print("metrics:", {k: samples.get(k) for k in expected})
if bad:
    print("mismatch (metrics, stats):", bad)
    sys.exit(1)
PY

status=0; stop_child "$guest" || status=$?
pids=("${pids[@]/$guest}")
python3 - "$work/guest.log" <<'PY' || fail "guest workload failed (exit $status): $(cat "$work/guest.err")"
import json, sys
report = json.load(open(sys.argv[1]))
print(f"guest: {report['ops']} ops, {report['reconnects']} reconnects, errors {report['errors']}, verify failures {report['verify_failures']}")
sys.exit(0 if report["errors"] == 0 and report["verify_failures"] == 0 else 1)
PY
[ "$status" -eq 0 ] || fail "guest exited $status: $(cat "$work/guest.err")"
echo "api-conformance: OK"
