"""The markdown table and the distribution chart, both rendered from the result JSON.

``python -m bench.report bench/results/<stamp>.json`` re-renders them from a saved run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.targets import targets_markdown

__all__ = ["fmt_value", "main", "render_chart", "render_markdown"]

#: The distributions charted: (workload, case, dist name, panel title).
CHART_PANELS: Final = (
    ("ttfb", "keepalive", "ttfb", "TTFB, keep-alive (c=1)"),
    ("ttfb", "fresh", "ttfb", "TTFB, fresh connection (c=1)"),
    ("sse", None, "event_delay", "SSE per-event delay"),
)


def _sig(v: float) -> str:
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_value(value: float | None, kind: str) -> str:
    """One figure, formatted for its kind (``rps``, ``ms``, ``us``, ``pct``...)."""
    if value is None:
        return "n/a"
    if kind in ("rps", "us", "count", "mbs"):
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{value:.1f}%" if abs(value) < 10 else f"{value:.0f}%"
    if kind in ("mib", "kib"):
        return f"{value:,.1f}"
    return _sig(value)


def _ratio(value: float | None, ref: float | None) -> str | None:
    if value is None or ref is None or ref <= 0 or value < 0:
        return None
    r = value / ref
    return f"{r:.2f}" if r < 10 else f"{r:,.0f}"


def _arrow(better: str | None) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(better or "", "")


def _cell(
    metric: dict[str, Any], name: str, entry: dict[str, Any], row: dict[str, dict[str, Any]]
) -> str:
    status: str = entry.get("status", "failed: no result")
    if status != "ok":
        return status.split(":", 1)[0]
    if metric["proxy_only"] and name == "direct":
        return "n/a"
    value = entry.get("metrics", {}).get(metric["key"])
    text = fmt_value(value, metric["kind"])
    if metric["better"] is None or value is None:
        return text
    ratios = []
    for ref_name, tag in (("direct", "d"), ("nginx", "n")):
        if ref_name == name or ref_name not in row:
            continue
        ref = row[ref_name]
        if ref.get("status") != "ok" or (metric["proxy_only"] and ref_name == "direct"):
            continue
        r = _ratio(value, ref.get("metrics", {}).get(metric["key"]))
        if r is not None:
            ratios.append(f"{r}x {tag}")
    return f"{text} ({', '.join(ratios)})" if ratios else text


def _environment_lines(doc: dict[str, Any]) -> list[str]:
    env = doc["environment"]
    pkgs = env.get("packages", {})
    shown = ", ".join(
        f"{name} {version}"
        for name, version in pkgs.items()
        if version
        and name
        in ("proxycore", "trio", "h11", "hypercorn", "fastapi", "uvicorn", "httpx", "aiohttp")
    )
    nginx = (env.get("nginx") or "nginx not installed").replace("nginx version: ", "")
    wrk = " ".join((env.get("wrk") or "wrk not installed").split()[:2])
    lines = [
        f"- Machine: {env['cpu_model']}, {env['usable_cores']} usable core(s); "
        f"{env['python_impl']} {env['python']}; {env['platform']}",
        f"- Packages: {shown}",
        f"- {nginx}; {wrk}",
        f"- Pinning: {env['pinning']['note']}",
        f"- RLIMIT_NOFILE given to every child: {env['rlimit_nofile']['hard']:,} "
        "(soft raised to the hard limit)",
    ]
    busy = env.get("busy_before_pct")
    if busy:
        shown_busy = ", ".join(f"core {i} {b:.0f}%" for i, b in enumerate(busy))
        lines.append(f"- Busy before the bench started (other processes): {shown_busy}")
    steal = doc.get("steal_pct")
    if steal is not None:
        lines.append(f"- Host steal over the whole run: {steal:.1f}% of all CPU time")
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    """The report: environment, then one table per case with every figure and its ratios."""
    names: list[str] = list(doc["scenarios"])
    out = [
        f"# proxycore bench, {doc['started_utc']} ({doc['mode']}, {doc['rounds']} round(s), "
        f"{doc['duration_s']:.0f} s)",
        "",
        *_environment_lines(doc),
        "- Scenarios (against the same two upstreams: the sim, and for `/small` the fast "
        "one; interleaved per workload, rotated per round):",
    ]
    for name, info in doc["scenarios"].items():
        out.append(f"  - `{name}`: {info['status']}; {info.get('description', '')}".rstrip("; "))
    for skipped in doc.get("skipped", []):
        out.append(f"- Not run in this mode: {skipped}")
    out += [
        "",
        "Each cell: the figure (median over rounds), then its ratio to `direct` (x d) and to "
        "`nginx` (x n) from this same run. ↑ higher is better, ↓ lower is better; ratios are "
        "shown only for such figures. Quote ratios, not absolute numbers: this is a shared, "
        "noisy machine.",
        *targets_markdown(doc),
    ]
    for cases in doc["workloads"].values():
        for case in cases.values():
            out += ["", f"### {case['title']}", ""]
            if case.get("skip"):
                out.append(f"_{case['skip']}_")
                continue
            row: dict[str, dict[str, Any]] = case["scenarios"]
            header = "| figure | " + " | ".join(f"`{n}`" for n in names) + " |"
            out += [header, "|---|" + "---:|" * len(names)]
            for metric in case["metrics"]:
                cells = [_cell(metric, n, row.get(n, {}), row) for n in names]
                label = metric["label"] + _arrow(metric["better"])
                out.append(f"| {label} | " + " | ".join(cells) + " |")
            steal_cells = []
            for n in names:
                steal = row.get(n, {}).get("steal_pct")
                steal_cells.append(f"{steal:.1f}%" if steal is not None else "")
            out.append("| host steal during the row | " + " | ".join(steal_cells) + " |")
            problems = [
                f"- `{n}`: {row[n]['status']}"
                for n in names
                if n in row and row[n].get("status", "ok") != "ok"
            ]
            if problems:
                out += ["", *problems]
            if case.get("note"):
                out += ["", f"_{case['note']}_"]
    out += ["", *[f"- {note}" for note in doc.get("notes", [])]]
    return "\n".join(out).rstrip() + "\n"


def render_chart(doc: dict[str, Any], path: Path) -> str | None:
    """Write the TTFB and SSE-delay CDFs per scenario to ``path`` (PNG).

    Returns None on success, or why no chart was drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return "matplotlib not installed: no chart (pip install -e '.[bench]')"
    workloads = doc["workloads"]
    panels = []
    for workload, case_key, dist_name, title in CHART_PANELS:
        cases = workloads.get(workload, {})
        keys = [case_key] if case_key is not None else list(cases)
        for key in keys:
            case = cases.get(key)
            if case and not case.get("skip"):
                panels.append((case, dist_name, title))
    if not panels:
        return "nothing to chart (no ttfb or sse results)"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (case, dist_name, title) in zip(axes[0], panels, strict=True):
        drawn = False
        for name, entry in case["scenarios"].items():
            points = entry.get("dist", {}).get(dist_name) or []
            if entry.get("status") != "ok" or not points:
                continue
            qs = [q for q, _ in points]
            ms = [max(v, 1e-3) for _, v in points]
            ax.plot(ms, qs, marker=".", label=name)
            drawn = True
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("percentile")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend()
    fig.suptitle(f"proxycore bench {doc['started_utc']} ({doc['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("json", type=Path, help="a result file written by python -m bench")
    parser.add_argument("--chart", action="store_true", help="also redraw the .png next to it")
    args = parser.parse_args(argv)
    doc = json.loads(args.json.read_text(encoding="utf-8"))
    print(render_markdown(doc), end="")
    if args.chart:
        problem = render_chart(doc, args.json.with_suffix(".png"))
        if problem:
            print(problem, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
