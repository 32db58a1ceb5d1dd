"""``python -m bench.profiling.sse_latency [STREAMS] [ROUNDS] [SCENARIOS]``: what a proxy
itself adds to each SSE event, from kernel timestamps of loopback packets.

For every event (its upstream ``t_ns`` stamp is unique) the time its bytes left the
proxy towards the client minus the time they arrived from the upstream, both stamped by
the kernel (``SO_TIMESTAMPNS`` on an ``AF_PACKET`` socket on ``lo``, outgoing packets
only). Unlike the bench's client-seen delay it leaves out the load core's scheduling.
Scenarios (default ``proxycore,nginx,aiohttp``) are started as the bench starts them
and measured in interleaved rounds (default 3) of STREAMS (default 10) streams x 100
events 10 ms apart. Needs root (raw sockets) and Linux. Run from the repository root.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from bench.env import Pinning
from bench.scenarios import StartContext, start_scenario, start_upstream

__all__ = ["main"]

_T_NS: Final = re.compile(rb'"t_ns": (\d+)')
_SO_TIMESTAMPNS: Final = 35
_ETH_P_ALL: Final = 0x0003


class _Sniffer(threading.Thread):
    """Kernel timestamps of each event arriving from the upstream and leaving the proxy."""

    def __init__(self, upstream_port: int, proxy_port: int) -> None:
        super().__init__(daemon=True)
        self.upstream_port, self.proxy_port = upstream_port, proxy_port
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(_ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.stopped = False
        self.arrived: dict[int, int] = {}
        self.left: dict[int, int] = {}

    def run(self) -> None:
        while not self.stopped:
            try:
                data, ancillary, _, addr = self.sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING or len(data) < 54 or data[23] != 6:
                continue  # each loopback packet is seen twice; TCP only
            stamp = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    stamp = sec * 1_000_000_000 + nsec
            if stamp is None:
                continue
            tcp = 14 + (data[14] & 15) * 4
            sport, dport = struct.unpack("!HH", data[tcp : tcp + 4])
            payload = data[tcp + (data[tcp + 12] >> 4) * 4 :]
            for m in _T_NS.finditer(payload):
                key = int(m.group(1))
                if sport == self.upstream_port and dport != self.upstream_port:
                    self.arrived.setdefault(key, stamp)
                elif sport == self.proxy_port:
                    self.left.setdefault(key, stamp)

    def latencies_us(self) -> list[float]:
        return [(self.left[k] - t) / 1000 for k, t in self.arrived.items() if k in self.left]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str]) -> int:
    streams = int(argv[0]) if argv else 10
    rounds = int(argv[1]) if len(argv) > 1 else 3
    names = argv[2].split(",") if len(argv) > 2 else ["proxycore", "nginx", "aiohttp"]
    pinning = Pinning.detect()
    tmp = Path(tempfile.mkdtemp(prefix="sse-latency-"))
    upstream, up_port = start_upstream(tmp, pinning)
    fast, fast_port = start_upstream(tmp, pinning, fast=True)
    ctx = StartContext(up_port, tmp, pinning, fast_port)
    inside: dict[str, list[list[float]]] = {n: [] for n in names}
    seen: dict[str, list[float]] = {n: [] for n in names}
    gen = [*pinning.prefix("load"), sys.executable, "-m", "bench.gen"]
    try:
        for rnd in range(rounds):
            for name in names:
                target = start_scenario(ctx, name)
                try:
                    spec = json.dumps(
                        {
                            "host": target.host,
                            "port": target.port,
                            "path": "/v1/stream?events=100&interval_ms=10&ttft_ms=0",
                            "concurrency": streams,
                            "requests": streams,
                            "sse": True,
                            "timeout": 60,
                        }
                    )
                    subprocess.run([*gen, spec], capture_output=True, check=True)  # warm-up
                    sniffer = _Sniffer(up_port, target.port)
                    sniffer.start()
                    time.sleep(0.3)
                    done = subprocess.run([*gen, spec], capture_output=True, text=True, check=True)
                    time.sleep(0.3)
                    sniffer.stopped = True
                    sniffer.join()
                finally:
                    target.stop()
                lat = sniffer.latencies_us()
                doc = json.loads(done.stdout)
                p50_us = doc.get("result", doc)["event_delay"]["p50"] * 1000
                inside[name].append(lat)
                seen[name].append(p50_us)
                print(
                    f"round {rnd + 1} {name}: {len(lat)} events; in-proxy p50 "
                    f"{_pct(lat, 0.5):.0f} us, p90 {_pct(lat, 0.9):.0f}, p99 "
                    f"{_pct(lat, 0.99):.0f}; client-seen delay p50 {p50_us:.0f} us",
                    flush=True,
                )
    finally:
        upstream.stop()
        fast.stop()
    print("medians over rounds:")
    for name in names:
        p50 = statistics.median(_pct(x, 0.5) for x in inside[name])
        p90 = statistics.median(_pct(x, 0.9) for x in inside[name])
        print(
            f"  {name}: in-proxy p50 {p50:.0f} us, p90 {p90:.0f} us; client-seen delay "
            f"p50 {statistics.median(seen[name]):.0f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
