"""The result document's arithmetic: medians over rounds, figures relative to ``direct``,
the compact JSON, the failures list, printing the markdown."""

from __future__ import annotations

import statistics
import sys
from typing import Any

from bench.workloads import Case

__all__ = ["add_relative", "aggregate", "compact", "failures", "print_markdown"]


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every figure over the rounds that succeeded."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return {"status": rounds[0]["status"] if rounds else "failed: not run", "metrics": {}}
    keys = list(dict.fromkeys(k for r in ok for k in r["metrics"]))
    metrics: dict[str, float | None] = {}
    for key in keys:
        values = [r["metrics"][key] for r in ok if r["metrics"].get(key) is not None]
        metrics[key] = statistics.median(values) if values else None
    steals = [r["steal_pct"] for r in ok if r.get("steal_pct") is not None]
    last = ok[-1]
    return {
        "status": "ok",
        "metrics": metrics,
        "steal_pct": max(steals) if steals else None,
        "dist": last.get("dist", {}),
        "loadgen": last.get("loadgen", {}),
    }


def add_relative(case: Case, round_results: dict[str, dict[str, Any]]) -> None:
    direct = round_results.get("direct")
    if not case.relative_to_direct or direct is None or direct["status"] != "ok":
        return
    for entry in round_results.values():
        if entry["status"] != "ok":
            continue
        for derived, base in case.relative_to_direct:
            value, ref = entry["metrics"].get(base), direct["metrics"].get(base)
            entry["metrics"][derived] = (
                value - ref if value is not None and ref is not None else None
            )


def compact(value: Any) -> Any:
    """The document with every float cut to 5 significant digits (a smaller file)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def failures(doc: dict[str, Any]) -> list[str]:
    out = [
        f"{n}: {s['status']}"
        for n, s in doc["scenarios"].items()
        if s["status"].startswith("failed")
    ]
    for workload, cases in doc["workloads"].items():
        for key, case in cases.items():
            for name, entry in case["scenarios"].items():
                if entry["status"].startswith("failed"):
                    out.append(f"{workload}/{key} {name}: {entry['status']}")
    return out


def print_markdown(markdown: str) -> None:
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.markdown import Markdown
        except ImportError:
            pass
        else:
            Console().print(Markdown(markdown))
            return
    print(markdown, end="", flush=True)
