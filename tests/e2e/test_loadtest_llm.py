"""LLM token streams and HTTPS in the load generator, on real sockets.

Timing tests use a scripted raw-socket upstream whose gaps are large next to the
tolerance: the SSE head and an empty role delta go out at once, the first content
token 200 ms later, then one every 100 ms. A token cannot arrive before it was sent,
so TTFT >= 200 ms is exact; the upper bounds (2 s) only tell bounded from broken, and
the ITL median is allowed 50 ms either way (two of four gaps would have to shrink by
half for it to fail). HTTPS targets are the simulator under hypercorn with trustme
certificates.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve

from proxycore.tools.loadgen import LoadSpec, run_load
from proxycore.tools.loadgen.bodies import llm_body, llm_headers
from proxycore.tools.sim import ASGIApp, make_app, server_log
from tests.helpers import start_app, start_raw_server

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
TTFT = 0.2
GAP = 0.1
BOUND = 2.0  # seconds: an upper bound that only tells a bounded run from a broken one

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def openai_event(content: str | None = None, **extra: object) -> bytes:
    event: dict[str, object] = dict(extra)
    if content is not None:
        event["choices"] = [{"index": 0, "delta": {"content": content}}]
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def read_request(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, bytes] | None:
    """One request (head, Content-Length body) off ``stream``; None at EOF."""
    while (k := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head = bytes(buf[: k + 4])
    del buf[: k + 4]
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        buf += await stream.receive_some(65536)
    body = bytes(buf[:length])
    del buf[:length]
    return head, body


def scripted(
    tokens: int, *, usage: int | None = None, end: bytes = b"data: [DONE]\n\n"
) -> tuple[Handler, list[bytes]]:
    """An OpenAI-style upstream with the scripted timings; also returns the bodies seen."""
    bodies: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while (request := await read_request(stream, buf)) is not None:
            bodies.append(request[1])
            role = b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
            await stream.send_all(SSE_HEAD + chunk(role))
            await trio.sleep(TTFT)
            for i in range(tokens):
                if i:
                    await trio.sleep(GAP)
                await stream.send_all(chunk(openai_event(f" w{i}")))
            tail = b""
            if usage is not None:
                tail += openai_event(None, choices=[], usage={"completion_tokens": usage})
            await stream.send_all(chunk(tail + end) + b"0\r\n\r\n")

    return handler, bodies


def stream_spec(
    port: int, fmt: str = "openai", path: str = "/v1/chat/completions", **kw: Any
) -> LoadSpec:
    fields: dict[str, Any] = {
        "method": "POST",
        "path": path,
        "headers": llm_headers(fmt),  # type: ignore[arg-type]
        "body_template": llm_body(fmt, "sim", 5),  # type: ignore[arg-type]
        "stream": fmt,
        "requests": 2,
        "concurrency": 2,
        "timeout": 10.0,
    }
    return LoadSpec("127.0.0.1", port, **(fields | kw))


# --------------------------------------------------------------------------- timings


async def test_ttft_and_itl_from_scripted_timings(nursery: trio.Nursery) -> None:
    handler, _ = scripted(5)
    port = await start_raw_server(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(stream_spec(port))
    assert (result.ok, result.errors) == (2, 0)
    # TTFT is the first non-empty content delta, not the first byte or the first event
    # (the role delta arrives at once): never before the scripted 200 ms.
    assert result.ttft.count == 2
    assert TTFT <= result.ttft.min <= result.ttft.max < BOUND
    assert result.ttfb.max < result.ttft.min
    # 5 deltas per stream: 4 gaps of 100 ms each.
    assert result.itl.count == 8
    assert GAP - 0.05 <= result.itl.percentile(50) <= GAP + 0.05
    assert result.itl.max < BOUND
    # No usage in the stream: tokens are the counted deltas, and the report says so.
    assert (result.output_tokens, result.counted_streams, result.usage_streams) == (10, 2, 0)
    assert len(result.stream_tps) == 2
    # 5 tokens over at least 0.6 s per stream: a bounded, non-zero rate.
    assert all(0 < tps <= 5 / (TTFT + 4 * GAP) for tps in result.stream_tps)
    data = result.to_json()
    assert data["tokens_source"] == {"usage": 0, "counted": 2}
    assert data["ttft"]["count"] == 2  # type: ignore[index]


async def test_usage_tokens_are_preferred_over_counted_deltas(nursery: trio.Nursery) -> None:
    handler, _ = scripted(3, usage=42)
    port = await start_raw_server(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(stream_spec(port))
    assert result.ok == 2
    assert (result.output_tokens, result.usage_streams, result.counted_streams) == (84, 2, 0)
    assert result.itl.count == 4  # ITL is still per delta


async def test_a_stream_without_its_terminator_is_an_error(nursery: trio.Nursery) -> None:
    # The body ends cleanly (last chunk) but [DONE] never came: an error, not a success.
    handler, _ = scripted(2, end=b"")
    port = await start_raw_server(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(stream_spec(port))
    assert result.error_kinds == {"incomplete": 2}
    assert (result.ok, result.ttft.count, result.output_tokens) == (0, 0, 0)


@pytest.mark.parametrize(
    ("fmt", "path"), [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")]
)
async def test_simulator_streams_both_formats(nursery: trio.Nursery, fmt: str, path: str) -> None:
    _, port = await start_app(nursery, make_app(ttft=0.1, interval=0.01))
    with trio.fail_after(10):
        good = await run_load(stream_spec(port, fmt, path, requests=4))
        cut = await run_load(stream_spec(port, fmt, path + "?cut=1"))
        counted = await run_load(stream_spec(port, fmt, path + "?usage=0&tokens=3"))
    assert (good.ok, good.errors) == (4, 0)
    assert good.output_tokens == 4 * 5  # max_tokens 5 in the built-in body, from usage
    assert good.usage_streams == 4
    assert 0.1 <= good.ttft.min <= good.ttft.max < BOUND
    assert good.itl.count == 4 * 4
    assert cut.error_kinds == {"incomplete": 2}
    assert (counted.ok, counted.output_tokens, counted.counted_streams) == (2, 6, 2)


async def test_body_template_differs_per_request(nursery: trio.Nursery) -> None:
    handler, bodies = scripted(1)
    port = await start_raw_server(nursery, handler)
    template = '{"n": {n}, "rand": "{rand}", "stream": true}'
    with trio.fail_after(10):
        result = await run_load(stream_spec(port, body_template=template, requests=6))
    assert result.ok == 6
    sent = [json.loads(body) for body in bodies]
    assert sorted(b["n"] for b in sent) == [1, 2, 3, 4, 5, 6]
    assert len({b["rand"] for b in sent}) == 6


# --------------------------------------------------------------------------- HTTPS


async def serve_tls(
    app: ASGIApp, pem: Path, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """``app`` under hypercorn over TLS on 127.0.0.1 (free port); reports the port."""
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.certfile = config.keyfile = str(pem)
    config.accesslog = None
    config.errorlog = server_log
    async with trio.open_nursery() as nursery:
        hyper_app: Any = app
        urls: list[str] = await nursery.start(partial(hyper_serve, hyper_app, config, mode="asgi"))
        task_status.started(int(urls[0].rsplit(":", 1)[1]))


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


async def start_tls_sim(nursery: trio.Nursery, ca: trustme.CA, tmp: Path, *names: str) -> int:
    pem = tmp / f"{names[0]}.pem"
    ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(pem))
    port: int = await nursery.start(serve_tls, make_app(ttft=0, interval=0.001), pem)
    return port


async def test_https_verified_with_a_ca_file_and_kept_alive(
    nursery: trio.Nursery, ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    port = await start_tls_sim(nursery, ca[0], tmp_path, "127.0.0.1")
    base = LoadSpec("127.0.0.1", port, path="/small", requests=20, concurrency=2, tls=True)
    with trio.fail_after(10):
        verified = await run_load(LoadSpec(**{**vars_of(base), "ca_file": str(ca[1])}))
        untrusted = await run_load(base)  # the system store does not know the trustme CA
        insecure = await run_load(LoadSpec(**{**vars_of(base), "insecure": True}))
        streamed = await run_load(
            stream_spec(port, tls=True, ca_file=str(ca[1]), requests=3, concurrency=1)
        )
    assert (verified.ok, verified.errors, verified.connections) == (20, 0, 2)  # keep-alive
    assert verified.body_bytes == 20 * 100
    assert untrusted.ok == 0 and set(untrusted.error_kinds) == {"tls"}
    assert untrusted.connections == 0
    assert insecure.ok == 20
    assert (streamed.ok, streamed.output_tokens) == (3, 15)


async def test_https_sni_names_the_certificate(
    nursery: trio.Nursery, ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    # The certificate is for llm.test only: dialling 127.0.0.1 verifies only when the
    # client sends and checks the name given with sni.
    port = await start_tls_sim(nursery, ca[0], tmp_path, "llm.test")
    spec = LoadSpec(
        "127.0.0.1", port, path="/small", requests=3, concurrency=1, tls=True, ca_file=str(ca[1])
    )
    with trio.fail_after(10):
        by_ip = await run_load(spec)
        by_name = await run_load(LoadSpec(**{**vars_of(spec), "sni": "llm.test"}))
    assert by_ip.error_kinds == {"tls": 3}
    assert (by_name.ok, by_name.errors) == (3, 0)


def vars_of(spec: LoadSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}
