"""The load generator's own process: ``python -m bench.gen '<json spec>' [--out FILE]``
runs one spec; ``python -m bench.gen --serve`` runs one spec per stdin line and answers
each with one stdout line (what the runner uses: the process starts once, not per run).

The spec is :class:`proxycore.tools.loadgen.LoadSpec`'s fields as JSON, except that the
request body is given by its size (``"body_bytes": n`` sends ``n`` bytes of ``x``).
The result written to FILE (or printed) is::

    {"result": LoadResult.to_json(), "dist": {name: [[q, ms], ...]}, "gen_cpu_s": s}

or ``{"error": "..."}`` for a spec that is not valid. ``dist`` holds a grid of
percentiles of each non-empty histogram (for the charts); ``gen_cpu_s`` is this
process's own CPU time during the run, so the report can tell when the load
generator, not the server, was the limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from proxycore.tools.loadgen import LoadResult, LoadSpec, run_load

__all__ = ["DIST_PERCENTILES", "main", "run_spec", "serve", "spec_from_json"]

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


def run_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """Run one spec (JSON form) and return the JSON-ready answer."""
    try:
        spec = spec_from_json(raw)
    except (TypeError, ValueError) as exc:
        return {"error": f"invalid spec: {exc}"}
    cpu0 = _cpu_seconds()
    result = trio.run(run_load, spec)
    cpu = _cpu_seconds() - cpu0
    return {"result": result.to_json(), "dist": _dist(result), "gen_cpu_s": cpu}


def serve(lines: TextIO, out: TextIO) -> None:
    """``{"ready": true}``, then one answer line on ``out`` per spec line on ``lines``,
    until EOF."""
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in lines:
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            answer: dict[str, Any] = {"error": f"not JSON: {exc}"}
        else:
            answer = run_spec(raw)
        out.write(json.dumps(answer) + "\n")
        out.flush()
        gc.collect()  # drop the last run's connections and buffers before the next


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gen", description=__doc__)
    parser.add_argument("spec", nargs="?", help="LoadSpec fields as a JSON object")
    parser.add_argument("--out", type=Path, help="write the result here (default: stdout)")
    parser.add_argument("--serve", action="store_true", help="read specs from stdin, one a line")
    args = parser.parse_args(argv)
    if args.serve:
        # Answers go to the real stdout; anything else printed goes to stderr.
        out = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)
        serve(sys.stdin, out)
        return 0
    if args.spec is None:
        parser.error("give a spec, or --serve")
    answer = run_spec(json.loads(args.spec))
    text = json.dumps(answer)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())
