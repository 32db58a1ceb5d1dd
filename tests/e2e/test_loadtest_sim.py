"""The simulator's chat formats (OpenAI, Anthropic) and its MCP endpoint, over real
sockets (hypercorn on 127.0.0.1). Timing checks are lower bounds only (a token cannot
arrive before it was sent); upper bounds just tell bounded from broken."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import h11
import pytest
import trio

from proxycore.tools.sim import make_app
from proxycore.tools.sim_llm import words
from tests.helpers import http_request, start_app

Headers = list[tuple[bytes, bytes]]


async def post_stream(
    host: str, port: int, target: str, body: dict[str, object]
) -> tuple[int, float, list[tuple[float, bytes, dict[str, object] | str]]]:
    """POST ``body``; ``(status, head time, [(time, event name, data)])``, times from the send."""
    data = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("host", "sim"),
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
    ]
    events: list[tuple[float, bytes, dict[str, object] | str]] = []
    status, head_at, pending = 0, 0.0, b""
    async with await trio.open_tcp_stream(host, port) as stream:
        t0 = trio.current_time()
        await stream.send_all(
            (conn.send(h11.Request(method="POST", target=target, headers=headers)) or b"")
            + (conn.send(h11.Data(data=data)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )  # fmt: skip
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, head_at = event.status_code, trio.current_time() - t0
            elif isinstance(event, h11.Data):
                now = trio.current_time() - t0
                pending += bytes(event.data)
                while b"\n\n" in pending:
                    one, pending = pending.split(b"\n\n", 1)
                    name = b"message"
                    payload: dict[str, object] | str = ""
                    for line in one.split(b"\n"):
                        if line.startswith(b"event: "):
                            name = line[7:]
                        elif line.startswith(b"data: "):
                            text = line[6:].decode()
                            payload = text if text == "[DONE]" else json.loads(text)
                    events.append((now, name, payload))
            else:
                assert pending == b""
                return status, head_at, events


@pytest.fixture
async def sim(nursery: trio.Nursery) -> tuple[str, int]:
    return await start_app(nursery, make_app(ttft=0.2, interval=0.05, mcp_expire_after=3))


async def test_openai_stream_real_text_timing_and_usage(sim: tuple[str, int]) -> None:
    with trio.fail_after(10):
        status, head_at, events = await post_stream(
            *sim, "/v1/chat/completions", {"model": "m", "max_tokens": 6, "stream": True}
        )
    assert status == 200
    payloads = [p for _, _, p in events]
    assert payloads[-1] == "[DONE]"
    chunks = [p for p in payloads[:-1] if isinstance(p, dict)]
    assert chunks[0]["choices"] == [  # the role first, with no content
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]  # type: ignore[index]
    assert texts == words(6)
    assert "".join(texts) == "The lighthouse keeper climbed the spiral"
    assert all(c["model"] == "m" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6  # type: ignore[index]
    times = [t for t, _, p in events if isinstance(p, dict) and has_content(p)]
    assert head_at < 0.2 <= times[0]  # the head at once, the first token after ttft
    assert times[-1] >= 0.2 + 5 * 0.05  # one token per interval
    assert times[-1] < 5.0


def has_content(chunk: dict[str, Any]) -> bool:
    return bool(chunk.get("choices") and chunk["choices"][0]["delta"].get("content"))


async def test_anthropic_stream_events_and_usage(sim: tuple[str, int]) -> None:
    with trio.fail_after(10):
        status, _, events = await post_stream(
            *sim, "/v1/messages", {"model": "claude-sim", "max_tokens": 3, "stream": True}
        )
    assert status == 200
    names = [name.decode() for _, name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    deltas = [p["delta"]["text"] for _, n, p in events if n == b"content_block_delta"]  # type: ignore[index]
    assert deltas == ["The", " lighthouse", " keeper"]
    message_delta = events[-2][2]
    assert isinstance(message_delta, dict)
    assert message_delta["usage"] == {"output_tokens": 3}
    assert message_delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[3][0] >= 0.2


async def test_chat_query_overrides_and_errors(sim: tuple[str, int]) -> None:
    host, port = sim
    fast = "?ttft_ms=0&interval_ms=0"
    with trio.fail_after(10):
        _, _, cut = await post_stream(
            host, port, "/v1/messages" + fast + "&cut=1", {"stream": True}
        )
        _, _, bare = await post_stream(
            host, port, "/v1/chat/completions" + fast + "&usage=0&tokens=4", {"stream": True}
        )
        status, _, whole = await http_request(
            host, port, "POST", "/v1/chat/completions" + fast, body=b'{"max_tokens": 3}'
        )
        bad = [
            (await http_request(host, port, "POST", path, body=body))[0]
            for path, body in (
                ("/v1/messages", b"not json"),
                ("/v1/messages", b'{"max_tokens": -1}'),
                ("/v1/messages", b'{"model": 5}'),
                ("/v1/messages?tokens=x", b"{}"),
            )
        ]
        get_status = (await http_request(host, port, "GET", "/v1/messages"))[0]
    assert [n for _, n, _ in cut][-1] == b"content_block_delta"  # no stop, no message_stop
    assert len([n for _, n, _ in cut if n == b"content_block_delta"]) == 16  # the default
    assert bare[-1][2] == "[DONE]"
    assert not any(isinstance(p, dict) and "usage" in p for _, _, p in bare)
    assert len(bare) == 1 + 4 + 1 + 1  # role, 4 tokens, finish, [DONE]
    assert status == 200
    answer = json.loads(whole)
    assert answer["choices"][0]["message"]["content"] == "The lighthouse keeper"
    assert answer["usage"]["completion_tokens"] == 3
    assert bad == [400, 400, 400, 400]
    assert get_status == 405


async def mcp_post(
    host: str, port: int, message: Mapping[str, object], session: str | None = None, query: str = ""
) -> tuple[int, Headers, bytes]:
    headers = [("content-type", "application/json")]
    if session is not None:
        headers.append(("mcp-session-id", session))
    return await http_request(
        host, port, "POST", "/mcp" + query, headers, json.dumps(message).encode()
    )


def field(headers: Headers, name: bytes) -> bytes | None:
    return next((v for n, v in headers if n == name), None)


async def test_mcp_sessions(sim: tuple[str, int]) -> None:
    host, port = sim
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
    call["params"] = {"name": "echo", "arguments": {"text": "hello"}}
    with trio.fail_after(10):
        status, headers, body = await mcp_post(host, port, init)
        assert status == 200
        assert json.loads(body)["result"]["serverInfo"]["name"] == "proxycore-sim"
        session = (field(headers, b"mcp-session-id") or b"").decode()
        assert len(session) == 32
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await mcp_post(host, port, note, session))[0] == 202
        status, _, body = await mcp_post(host, port, call, session)
        assert json.loads(body)["result"]["content"] == [{"type": "text", "text": "hello"}]
        status, headers, body = await mcp_post(host, port, call, session, "?sse=1")
        assert field(headers, b"content-type") == b"text/event-stream"
        assert body.startswith(b"event: message\ndata: {") and body.endswith(b"\n\n")
        assert (await mcp_post(host, port, call, session))[0] == 200  # the third call
        # Three calls used the session up (mcp_expire_after=3): now it is gone.
        status, _, body = await mcp_post(host, port, call, session)
        assert status == 404
        assert json.loads(body)["error"]["code"] == -32001
        assert (await mcp_post(host, port, call))[0] == 400  # no session at all
        unknown = {"jsonrpc": "2.0", "id": 3, "method": "nope"}
        _, headers, _ = await mcp_post(host, port, init)
        fresh = (field(headers, b"mcp-session-id") or b"").decode()
        _, _, body = await mcp_post(host, port, unknown, fresh)
        assert json.loads(body)["error"]["code"] == -32601
        delete = [("mcp-session-id", fresh)]
        assert (await http_request(host, port, "DELETE", "/mcp", delete))[0] == 200
        assert (await http_request(host, port, "DELETE", "/mcp", delete))[0] == 404
        assert (await http_request(host, port, "POST", "/mcp", body=b"{"))[0] == 400


def test_demo_streams_text_and_time_to_first_token_through_the_proxy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxycore", "demo", "--requests", "2", "--events", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # Both formats, the real text of the simulator, and the figures of each stream.
    assert "openai POST /v1/chat/completions via proxycore" in out
    assert "anthropic POST /v1/messages via proxycore" in out
    assert out.count("The lighthouse keeper climbed the") == 2
    assert out.count("time to first token") == 2
    assert out.count("5 tokens (from usage)") == 2
    ttfts = [float(m) for m in re.findall(r"time to first token ([0-9.]+) ms", out)]
    assert len(ttfts) == 2 and all(t >= 150.0 for t in ttfts)  # the demo's ttft: 150 ms
