"""``python -m bench.profiling.keepalive_client HOST PORT N [HEADER]``: N sequential
``GET /small`` (100-byte answers) on one keep-alive connection, blocking, TCP_NODELAY.
With ``FRESH=1`` in the environment each request goes on a new connection (closed by
the client after the answer), to profile the fresh-connection path."""

from __future__ import annotations

import os
import socket
import sys
import time


def main(argv: list[str]) -> int:
    host, port, n = argv[0], int(argv[1]), int(argv[2])
    header = argv[3] if len(argv) > 3 else ""
    request = f"GET /small HTTP/1.1\r\nHost: bench\r\n{header}\r\n".encode()
    fresh = os.environ.get("FRESH") == "1"
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(n):
        if fresh:
            sock.close()
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed the connection")
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0 and len(buf) >= end + 4 + 100:
                break
    elapsed = time.perf_counter() - t0
    print(f"{n} requests in {elapsed:.3f}s: {elapsed / n * 1e6:.1f} us each")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
