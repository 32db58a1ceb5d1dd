"""``python -m bench.upstream --port N``: the simulated LLM upstream as its own process.

Runs :func:`proxycore.tools.sim.make_app` under hypercorn's trio worker until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from proxycore.tools.sim import make_app, serve_app

__all__ = ["main"]


async def _serve(host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_app, make_app(), host=host, port=port))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    trio.run(_serve, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
