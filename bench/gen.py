"""``python -m bench.gen '<json spec>' --out FILE``: one load-generator run, own process.

The spec is :class:`proxycore.loadgen.LoadSpec`'s fields as JSON, except that the
request body is given by its size (``"body_bytes": n`` sends ``n`` bytes of ``x``).
The result written to FILE (or printed) is::

    {"result": LoadResult.to_json(), "dist": {name: [[q, ms], ...]}, "gen_cpu_s": s}

``dist`` holds a grid of percentiles of each non-empty histogram (for the charts);
``gen_cpu_s`` is this process's own CPU time during the run, so the report can tell
when the load generator, not the server, was the limit.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trio

from proxycore.loadgen import LoadResult, LoadSpec, run_load

__all__ = ["DIST_PERCENTILES", "main", "spec_from_json"]

#: The percentiles kept per histogram for the distribution charts.
DIST_PERCENTILES: Final = (
    0.0,
    1.0,
    2.0,
    5.0,
    *(float(q) for q in range(10, 95, 5)),
    95.0,
    97.0,
    98.0,
    99.0,
    99.5,
    99.9,
    100.0,
)


def spec_from_json(raw: dict[str, Any]) -> LoadSpec:
    """A LoadSpec from the JSON form (``body_bytes`` instead of ``body``)."""
    fields = dict(raw)
    body_bytes = int(fields.pop("body_bytes", 0))
    headers = tuple((str(name), str(value)) for name, value in fields.pop("headers", ()))
    return LoadSpec(**fields, headers=headers, body=b"x" * body_bytes)


def _dist(result: LoadResult) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for name in ("ttfb", "latency", "first_event", "event_delay"):
        hist = getattr(result, name)
        if hist.count:
            values = hist.percentiles(DIST_PERCENTILES)
            out[name] = [[q, v * 1000.0] for q, v in zip(DIST_PERCENTILES, values, strict=True)]
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gen", description=__doc__)
    parser.add_argument("spec", help="LoadSpec fields as a JSON object")
    parser.add_argument("--out", type=Path, help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    spec = spec_from_json(json.loads(args.spec))
    cpu0 = _cpu_seconds()
    result = trio.run(run_load, spec)
    cpu = _cpu_seconds() - cpu0
    text = json.dumps({"result": result.to_json(), "dist": _dist(result), "gen_cpu_s": cpu})
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
