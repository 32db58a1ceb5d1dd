"""A real ``proxycore serve`` process loses no access line on SIGTERM.

The access log is held in memory and written in batches (``BufferedLineHandler``):
the lines of the last requests before a SIGTERM are still held when the signal
comes, and must all be in the log once the process has exited. No speed is asserted.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Final

import trio

from tests.e2e.test_lifecycle import LISTENING, spawn_proxycore, wait_for_log
from tests.helpers import read_until, start_raw_server

REQUESTS: Final = 60
BODY: Final = b"hello"


async def _upstream(stream: trio.SocketStream) -> None:
    """Answers every request head with 200 ``hello``, keep-alive."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    pending = b""
    while True:
        try:
            pending += await read_until(stream, b"\r\n\r\n")
        except EOFError:
            return
        while b"\r\n\r\n" in pending:
            _, _, pending = pending.partition(b"\r\n\r\n")
            await stream.send_all(response)


async def _requests(port: int, ids: list[str]) -> None:
    """``GET /n`` for each id on one keep-alive connection, each answer read whole."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for rid in ids:
            head = (f"GET /n HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {rid}\r\n\r\n").encode()
            await stream.send_all(head)
            got = await read_until(stream, b"\r\n\r\n")
            while not got.endswith(BODY):
                more = await stream.receive_some(4096)
                assert more, "the proxy closed the connection mid-answer"
                got += more
            assert got.startswith(b"HTTP/1.1 200 "), got[:100]


async def test_sigterm_right_after_the_last_answer_loses_no_access_line(tmp_path: Path) -> None:
    log = tmp_path / "err.log"
    ids = [f"flush-test-{i:04d}" for i in range(REQUESTS)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, _upstream)
            args = ["serve", "--upstream", f"http://127.0.0.1:{up}/", "--listen", "127.0.0.1:0"]
            async with spawn_proxycore(args, log) as process:
                port = int((await wait_for_log(log, LISTENING, process))[1])
                await _requests(port, ids)
                process.send_signal(signal.SIGTERM)  # at once: the last lines are held
                code = await process.wait()
            nursery.cancel_scope.cancel()
    text = log.read_text(encoding="utf-8")
    assert code == 0, text
    logged = [
        json.loads(line)["request_id"]
        for line in text.splitlines()
        if line.startswith("{") and re.search(r'"request_id":"flush-test-', line)
    ]
    assert logged == ids, f"{len(logged)} of {len(ids)} access lines in the log:\n{text[-2000:]}"
