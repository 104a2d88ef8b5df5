#!/bin/bash
# Reads the serial console log of one rig run and prints the results: every check, what the
# guests negotiated, and the throughput table of blkback-server vs kernel blkback vs qdisk.
# Exit 0 only if dom0 finished and no check failed.
set -uo pipefail
serial=$1
lines=$(grep -a -o 'E2E-[A-Z]*.*' "$serial" | tr -d '\r')

echo
echo "== checks"
echo "$lines" | grep '^E2E-RESULT' | grep -vE 'test=(randread-4k|randwrite-4k|seqread-1m|seqwrite-1m) ok=1' \
    | sed 's/^E2E-RESULT /  /'
echo
echo "== negotiated (fe.* written by the guest's xen-blkfront, be.* offered by the backend)"
echo "$lines" | grep '^E2E-NEGOTIATED' | sed 's/^E2E-NEGOTIATED /  /'
echo
echo "== throughput under QEMU TCG: medians of the rounds (compare columns, not absolute numbers)"
echo "$lines" | grep '^E2E-RESULT' | awk '
    { b=""; t=""; v="";
      for (i = 2; i <= NF; i++) { split($i, kv, "=");
        if (kv[1] == "backend") b = kv[2]; else if (kv[1] == "test") t = kv[2];
        else if (kv[1] == "ok" && kv[2] != 1) t = "";
        else if (kv[1] == "iops" && t ~ /4k/) v = kv[2];
        else if (kv[1] == "mibs" && t ~ /1m/) v = kv[2]; }
      if (t != "" && v != "") { n[t, b]++; r[t, b, n[t, b]] = v } }
    function median(t, b,    k, i, j, x, a) {
      k = n[t, b]; for (i = 1; i <= k; i++) a[i] = r[t, b, i] + 0
      for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
      return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2 }
    function cell(t, b) { return ((t, b) in n) ? sprintf("%s (%d)", median(t, b), n[t, b]) : "-" }
    function ratio(t, b) { return ((t, b) in n && (t, "ours") in n && median(t, b) > 0) ? sprintf("%.2f", median(t, "ours") / median(t, b)) : "-" }
    END {
      printf "  %-22s %14s %14s %14s %14s %12s %12s\n", "workload", "ours", "kernel", "qdisk", "ours-order4", "ours/kernel", "ours/qdisk"
      split("randread-4k randwrite-4k seqread-1m seqwrite-1m", ts, " ")
      for (i = 1; i <= 4; i++) { t = ts[i]; u = (t ~ /4k/) ? " IOPS QD32" : " MiB/s QD8"
        printf "  %-22s %14s %14s %14s %14s %12s %12s\n", t u, cell(t, "ours"), cell(t, "kernel"), cell(t, "qdisk"), cell(t, "ours-order4"), ratio(t, "kernel"), ratio(t, "qdisk") }
    }'
echo "  (n) = rounds measured"
echo
echo "== restarts under a verifying guest (blkback-server SIGKILLed 3 times, upgraded once)"
echo "$lines" | grep -E '^E2E-DOM0 (restart|takeover)' | sed 's/^E2E-DOM0 /  /'
echo "$lines" | grep -E '^E2E-RESULT backend=ours-restart' | sed 's/^E2E-RESULT /  /'
echo
unmapped=$(grep -a -c 'has not unmapped grant' "$serial" || true)
echo "== guest kernels reporting \"has not unmapped grant\": $unmapped"
echo
status=0
if ! echo "$lines" | grep -q '^E2E-DOM0 phase=done'; then echo "FAIL: dom0 did not finish (timeout or crash); see $serial"; status=1; fi
if echo "$lines" | grep '^E2E-RESULT' | grep -q ' ok=0'; then echo "FAIL: $(echo "$lines" | grep '^E2E-RESULT' | grep -c ' ok=0') check(s) failed"; status=1; fi
if ! echo "$lines" | grep -q '^E2E-RESULT backend=ours test=checksum ok=1'; then echo "FAIL: no verified checksum on blkback-server"; status=1; fi
if [ "$unmapped" != 0 ]; then echo "FAIL: a guest found grants still mapped by a backend ($unmapped line(s))"; status=1; fi
if ! echo "$lines" | grep -q '^E2E-NEGOTIATED backend=ours-order4 .*fe.ring-page-order=4'; then
    echo "NOTE: no multi-page ring negotiated with blkback-server (ours-order4 not run or refused)"
fi
[ $status = 0 ] && echo "PASS: all checks passed"
exit $status
