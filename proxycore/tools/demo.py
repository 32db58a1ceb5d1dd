"""``proxycore demo``: the LLM simulator as upstream, the proxy in front, and a few chat
streams through it (OpenAI and Anthropic formats in turn), their text printed token by
token as it arrives, with the time to first byte and to first token."""

from __future__ import annotations

import json
import sys
from typing import Final

import h11
import trio

from ..config import Config, Route, ServerSettings
from ..ops.server import serve
from ..tools.loadgen.bodies import llm_headers
from ..tools.loadgen.llm import StreamFormat, TokenStream
from ..tools.sim import make_app, serve_app

__all__ = ["run_demo"]

#: The simulator's pace in the demo: slow enough to watch the words arrive.
TTFT: Final = 0.15
INTERVAL: Final = 0.04
_PATHS: Final[dict[StreamFormat, str]] = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
}


async def _stream(host: str, port: int, fmt: StreamFormat, tokens: int) -> tuple[int, bool]:
    """One streamed chat through the proxy, printed as it comes: (status, ended right)."""
    body = json.dumps(
        {
            "model": "sim",
            "max_tokens": tokens,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about the lighthouse keeper."}],
        }
    ).encode()
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", f"{host}:{port}"), *llm_headers(fmt), ("Content-Length", str(len(body)))]
    request = h11.Request(method="POST", target=_PATHS[fmt], headers=headers)
    parsed = TokenStream(fmt, keep_text=True)
    assert parsed.text is not None
    status, ttfb, shown = 0, 0.0, 0
    async with await trio.open_tcp_stream(host, port) as stream:
        t0 = trio.current_time()
        await stream.send_all(
            (conn.send(request) or b"") + (conn.send(h11.Data(data=body)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )  # fmt: skip
        print(f"{fmt} POST {_PATHS[fmt]} via proxycore:\n  ", end="", flush=True)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not ttfb:
                    ttfb = trio.current_time() - t0
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parsed.feed(event.data, trio.current_time() - t0)
                print("".join(parsed.text[shown:]), end="", flush=True)
                shown = len(parsed.text)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    total = trio.current_time() - t0
    ttft = f"{parsed.deltas[0] * 1000:.1f} ms" if parsed.deltas else "-"
    source = "from usage" if parsed.usage_tokens is not None else "counted"
    end = "done" if parsed.terminated else "CUT (no terminator)"
    print(
        f"\n  status {status}, time to first byte {ttfb * 1000:.1f} ms, time to first token "
        f"{ttft}, {parsed.tokens} tokens ({source}) in {total * 1000:.1f} ms, {end}\n"
    )
    return status, parsed.terminated


async def _demo(requests: int, events: int, keep: bool, port: int) -> int:
    async with trio.open_nursery() as nursery:
        up_host, up_port = await nursery.start(
            serve_app, make_app(ttft=TTFT, interval=INTERVAL, events=events)
        )
        config = Config(
            routes=(Route(prefix="/", upstream=f"http://{up_host}:{up_port}/", name="llm"),),
            server=ServerSettings(listen=(f"127.0.0.1:{port if keep else 0}",)),
        )
        (host, proxy_port), *_ = await nursery.start(serve, config)
        print(
            f"upstream (LLM simulator, OpenAI and Anthropic formats) on http://{up_host}:{up_port}"
        )
        print(f"proxycore on http://{host}:{proxy_port}\n")
        failures = 0
        for i in range(requests):
            fmt: StreamFormat = "openai" if i % 2 == 0 else "anthropic"
            status, ended = await _stream(host, proxy_port, fmt, events)
            if status != 200 or not ended:
                failures += 1
        if keep:
            base = f"http://{host}:{proxy_port}"
            print(
                f"both are running; try:\n"
                f"  proxycore loadtest {base}/v1/chat/completions --stream openai -c 8 -n 40\n"
                f"  proxycore loadtest {base}/mcp --mcp tools/list -c 4 -n 200\n"
                f'  curl -N {base}/v1/messages -d \'{{"stream": true, "max_tokens": 30}}\'\n'
                "(Ctrl-C to stop)"
            )
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return 1 if failures else 0


def run_demo(requests: int = 3, events: int = 8, *, keep: bool = False, port: int = 0) -> int:
    """Run the demo; ``events`` is the tokens per stream. Exit code: 1 if a stream failed."""
    try:
        return trio.run(_demo, requests, events, keep, port)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
