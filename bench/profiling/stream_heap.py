"""``python -m bench.profiling.stream_heap N UPSTREAM_URL``: the Python heap per held SSE
stream, and what holds it.

Runs proxycore in this process (``serve`` with one catch-all route to ``UPSTREAM_URL``,
e.g. ``python -m bench.upstream --port 8000`` on another core) under tracemalloc; a
client process opens N streams of ``/v1/stream?events=2&interval_ms=3600000`` and holds
them after the first event. The heap is compared with the idle baseline: by file, by
line, and the new gc-tracked objects by type (shallow sizes; coroutines by function).
RSS under tracemalloc is not the real RSS (tracemalloc keeps its own tracebacks): the
traced heap is the figure. Run from the tree to measure (``PYTHONPATH=TREE``).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc
from collections import Counter

import trio

from proxycore import Config, Route
from proxycore.config import ServerSettings
from proxycore.ops.server import serve

__all__ = ["main"]

_CLIENT = """
import socket, sys, time
socks = []
for i in range({n}):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.sendall(b"GET /v1/stream?events=2&interval_ms=3600000&ttft_ms=0 HTTP/1.1\\r\\n"
              b"Host: x\\r\\nAccept: text/event-stream\\r\\n\\r\\n")
    socks.append(s)
for s in socks:
    buf = b""
    while b"data:" not in buf:
        buf += s.recv(65536)
print("held", flush=True)
time.sleep(3600)
"""


def _start_client(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def _objects(skip: set[int], n: int) -> None:
    size: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for obj in gc.get_objects():
        if id(obj) in skip:
            continue
        kind = type(obj)
        key = f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        size[key] += sys.getsizeof(obj)
        count[key] += 1
        code = getattr(obj, "cr_code", None)
        if code is not None:
            fn = f"  coroutine {code.co_qualname}"
            size[fn] += sys.getsizeof(obj)
            count[fn] += 1
    total = sum(v for k, v in size.items() if not k.startswith(" "))
    print(f"-- new gc-tracked objects: {total / 1024 / n:.2f} KiB per stream (shallow)")
    for key, value in size.most_common(60):
        if value / n >= 40:
            print(f"{value / n:7.0f} B  {count[key] / n:5.2f}x  {key}")


async def _run(n: int, upstream: str) -> None:
    config = Config(
        routes=(Route(prefix="/", upstream=upstream),),
        server=ServerSettings(listen=("127.0.0.1:0",)),
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(serve, config)
        port = addresses[0][1]
        await trio.sleep(0.5)
        gc.collect()
        skip = {id(o) for o in gc.get_objects()}  # before the baseline: not counted
        before = tracemalloc.take_snapshot()
        code = _CLIENT.format(n=n, port=port)
        client = await trio.to_thread.run_sync(_start_client, code)
        try:
            assert client.stdout is not None
            line = await trio.to_thread.run_sync(client.stdout.readline)
            if line.strip() != b"held":
                raise SystemExit(f"the client did not hold its streams: {line!r}")
            await trio.sleep(1.0)
            gc.collect()
            after = tracemalloc.take_snapshot()
            by_file = after.compare_to(before, "filename")
            traced = sum(s.size_diff for s in by_file)
            print(f"{n} streams: traced Python heap +{traced / 1024 / n:.2f} KiB per stream")
            print("-- by file (KiB per stream, blocks per stream)")
            for s in by_file[:15]:
                name = s.traceback[0].filename
                print(f"{s.size_diff / 1024 / n:7.2f} {s.count_diff / n:6.1f}  {name}")
            print("-- by line")
            for s in after.compare_to(before, "lineno")[:30]:
                frame = s.traceback[0]
                where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
                print(f"{s.size_diff / 1024 / n:7.2f} {s.count_diff / n:6.1f}  {where}")
            _objects(skip, n)
        finally:
            client.kill()
            client.wait()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    tracemalloc.start(12)
    trio.run(_run, int(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
