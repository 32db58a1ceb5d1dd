#!/bin/bash
# usage: cpu.sh TREE plain|full|group1|group3 N [prefix...]
#   The proxycore in TREE (run from TREE) pinned to core 0 behind the canned-response
#   upstream, N sequential keep-alive GET /small from core 1 after 2,000 warm-up ones.
#   Prints CPU per request (schedstat; user/sys from stat). PYARGS="-m cProfile -o F"
#   wraps the proxy; a prefix (e.g. valgrind ...) goes before python; HOOK_START and
#   HOOK_END are eval-ed around the measured requests with $PID set (py-spy, strace,
#   callgrind_control: see bench/README.md).
TREE=$(cd "$1" && pwd); MODE=$2; N=$3; shift 3
PY=${PY:-python}
HERE=$(cd "$(dirname "$0")/../.." && pwd)   # the repository holding bench/
OUT=${OUT:-/tmp/proxycore-profile}; mkdir -p $OUT
cd $HERE
UPP=$(( 20000 + RANDOM % 10000 )); PXP=$(( UPP + 1 ))
taskset -c 1 $PY -m bench.fast_upstream --port $UPP > $OUT/fast.log 2>&1 &
FUP=$!
sleep 0.7
HDR=""
if [ "$MODE" = full ]; then
  mkdir -p $OUT/full; echo "bench-inbound-secret-0123456789abcdef" > $OUT/full/in.secret; chmod 600 $OUT/full/in.secret
  echo "bench-upstream-api-key" > $OUT/full/tok; chmod 600 $OUT/full/tok
  cat > $OUT/full/p.toml <<EOT
[inbound]
mode = "bearer"
secret_file = "$OUT/full/in.secret"
[admin]
listen = "127.0.0.1:$((PXP+1))"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:$UPP/"
inject = { header = "x-api-key", token_file = "$OUT/full/tok" }
EOT
  ARGS="serve --config $OUT/full/p.toml --listen 127.0.0.1:$PXP"
  HDR="Authorization: Bearer bench-inbound-secret-0123456789abcdef"
  ERR=$OUT/access.log
elif [ "$MODE" = group1 ] || [ "$MODE" = group3 ]; then
  # issue 14's cost: one route over a group of three upstreams (the same server under
  # three names, least_connections, retries and ejection on) versus a group of one
  mkdir -p $OUT/group
  if [ "$MODE" = group3 ]; then
    UPS="{ url = \"http://127.0.0.1:$UPP/\", name = \"a\" }, { url = \"http://127.0.0.1:$UPP/\", name = \"b\" }, { url = \"http://127.0.0.1:$UPP/\", name = \"c\" }"
  else
    UPS="{ url = \"http://127.0.0.1:$UPP/\", name = \"a\" }"
  fi
  cat > $OUT/group/p.toml <<EOT
[[routes]]
prefix = "/"
upstreams = [ $UPS ]
retry = { attempts = 2, on = ["connect_error", "503"] }
EOT
  ARGS="serve --config $OUT/group/p.toml --listen 127.0.0.1:$PXP --no-access-log"
  ERR=$OUT/proxy.log
else
  ARGS="serve --upstream http://127.0.0.1:$UPP/ --listen 127.0.0.1:$PXP --no-access-log"
  ERR=$OUT/proxy.log
fi
(cd "$TREE" && exec taskset -c 0 "$@" $PY $PYARGS -m proxycore $ARGS > $ERR 2>&1) &
PX=$!
for i in $(seq 1 3000); do curl -s -o /dev/null -H "$HDR" http://127.0.0.1:$PXP/small && break; sleep 0.1; done
PID=$(pgrep -P $PX -f "proxycore" | head -1); [ -z "$PID" ] && PID=$PX
# warm up
taskset -c 1 $PY -m bench.profiling.keepalive_client 127.0.0.1 $PXP 2000 "${HDR:+$HDR$'\r\n'}" > /dev/null
echo "proxy pid $PID" >&2
[ -n "$HOOK_START" ] && eval "$HOOK_START"
read U0 S0 < <(awk '{print $14, $15}' /proc/$PID/stat); R0=$(awk '{print $1}' /proc/$PID/schedstat)
taskset -c 1 $PY -m bench.profiling.keepalive_client 127.0.0.1 $PXP $N "${HDR:+$HDR$'\r\n'}"
read U1 S1 < <(awk '{print $14, $15}' /proc/$PID/stat); R1=$(awk '{print $1}' /proc/$PID/schedstat)
[ -n "$HOOK_END" ] && eval "$HOOK_END"
echo "cpu/request: total $(( (R1-R0)/N/1000 )) us; user $(( (U1-U0)*10000/N )) us, sys $(( (S1-S0)*10000/N )) us"
kill -TERM $PX; wait $PX 2>/dev/null
kill $FUP; wait $FUP 2>/dev/null
