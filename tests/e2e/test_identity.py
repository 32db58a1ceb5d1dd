"""The caller's identity reaches transcripts and hooks (not the rate-limit key)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import trio

import proxycore
from proxycore.net.client import fetch
from proxycore.security.secrets import generate_secret
from proxycore.tools.sim import make_app
from tests.helpers import start_app


def _new_secret(tmp_path: Path) -> tuple[str, str]:
    secret_file = str(tmp_path / "inbound.secret")
    generate_secret(secret_file)
    return secret_file, Path(secret_file).read_text().strip()


async def test_bearer_identity_is_in_the_transcript_and_the_hook(tmp_path: Path) -> None:
    secret_file, secret = _new_secret(tmp_path)
    transcript = tmp_path / "t.jsonl"
    seen: list[str] = []

    async def on_exchange_end(info: proxycore.ExchangeInfo, summary: proxycore.Summary) -> None:
        seen.append(info.identity)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app(ttft=0, interval=0.001, events=3))
            route = proxycore.Route(
                prefix="/",
                upstream=f"http://{host}:{port}/",
                sse=proxycore.SSESettings(transcript=str(transcript)),
                rate_limit=proxycore.RateLimit(requests_per_second=100, key="client_ip"),
            )
            config = proxycore.Config(
                routes=(route,),
                server=proxycore.ServerSettings(listen=("127.0.0.1:0",)),
                inbound=proxycore.Inbound(mode="bearer", secret_file=secret_file),
            )
            hooks = proxycore.Hooks(on_exchange_end=on_exchange_end)
            ((phost, pport),) = await nursery.start(
                functools.partial(proxycore.serve, config, hooks=hooks)
            )
            res = await fetch(
                phost, pport, "/v1/stream", headers=[("Authorization", f"Bearer {secret}")]
            )
            assert res.status == 200
            # The writer task appends in a worker thread: no event to wait on.
            while not transcript.exists():  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    line = json.loads(transcript.read_text().splitlines()[0])
    assert line["identity"] == "bearer:0"
    assert seen == ["bearer:0"]
    assert secret not in transcript.read_text()
