#!/bin/bash
# usage: sse_cpu.sh TREE STREAMS EVENTS [prefix...]
#   The proxycore in TREE (run from TREE) pinned to core 0 in front of the sim upstream;
#   the bench load generator (core 1) opens STREAMS streams of EVENTS events 10 ms
#   apart. Prints the proxy's CPU per event and the client-seen delay. HOOK_START and
#   HOOK_END as in cpu.sh ($PID set); a prefix (e.g. valgrind ...) goes before python,
#   as in cpu.sh (under callgrind use few streams, e.g. 10 200: the proxy runs ~50x
#   slower and must still keep up with the events' pace).
TREE=$(cd "$1" && pwd); S=$2; E=$3; shift 3
PY=${PY:-python}
HERE=$(cd "$(dirname "$0")/../.." && pwd)   # the repository holding bench/
OUT=${OUT:-/tmp/proxycore-profile}; mkdir -p $OUT
cd $HERE
UPP=$(( 12000 + RANDOM % 8000 )); PXP=$(( UPP + 1 ))   # below the ephemeral ports
taskset -c 1 $PY -m bench.upstream --port $UPP > $OUT/sim.log 2>&1 &
SIM=$!
for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:$UPP/healthz && break; sleep 0.1; done
kill -0 $SIM 2>/dev/null || { echo "upstream did not start: $OUT/sim.log" >&2; exit 1; }
(cd "$TREE" && exec taskset -c 0 "$@" $PY -m proxycore serve --upstream http://127.0.0.1:$UPP/ --listen 127.0.0.1:$PXP --no-access-log > $OUT/proxy.log 2>&1) &
PID=$!
for i in $(seq 1 600); do curl -s -o /dev/null http://127.0.0.1:$PXP/small && break; sleep 0.1; done
SPEC="{\"host\":\"127.0.0.1\",\"port\":$PXP,\"path\":\"/v1/stream?events=$E&interval_ms=10&ttft_ms=0\",\"concurrency\":$S,\"requests\":$S,\"sse\":true,\"timeout\":60}"
taskset -c 1 $PY -m bench.gen "$SPEC" > /dev/null 2>&1   # warm-up
[ -n "$HOOK_START" ] && eval "$HOOK_START"
R0=$(awk '{print $1}' /proc/$PID/schedstat)
taskset -c 1 $PY -m bench.gen "$SPEC" > $OUT/gen.json 2>$OUT/gen.err
R1=$(awk '{print $1}' /proc/$PID/schedstat)
[ -n "$HOOK_END" ] && eval "$HOOK_END"
$PY - <<PYEOF
import json
d=json.load(open("$OUT/gen.json")); r=d.get("result",d)
ev=r["events"]; dl=r["event_delay"]
print(f"events {ev}; proxy CPU/event {($R1-$R0)/1000/ev:.1f} us; delay ms p50 {dl['p50']:.3f} p90 {dl.get('p90',float('nan')):.3f} p99 {dl['p99']:.3f}")
PYEOF
kill $PID $SIM; wait 2>/dev/null
