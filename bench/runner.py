"""``python -m bench``: start the upstream and every scenario, run the workloads
interleaved, write ``<out>/<UTC stamp>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench.cases import build_cases
from bench.env import Pinning, StealMeter, busy_cores, environment
from bench.measure import MeasureError, Meter
from bench.procs import Child, StartError
from bench.report import render_chart, render_markdown
from bench.results import add_relative, aggregate, compact, failures, print_markdown
from bench.scenarios import (
    REPO_ROOT,
    SCENARIOS,
    Running,
    StartContext,
    child_env,
    find_nginx,
    find_wrk,
    start_scenario,
    start_upstream,
    unavailable_reason,
)
from bench.workloads import SIZES, WORKLOADS, Case, Measurement, Sizes

__all__ = ["main"]

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
#: How long a process may take to close what a case left open before it is restarted.
SETTLE_S = 20.0
#: Open fds above the start-up count that still count as settled (idle pooled
#: upstream connections to both upstreams, e.g. nginx's 2 x 64; for the upstream,
#: every proxy's pool).
SETTLED_EXTRA_FDS = {"proxy": 250, "upstream": 1000}
_MEASURE_ERRORS = (MeasureError, StartError, OSError, ValueError, KeyError, psutil.Error)


def _csv(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(allowed)}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark proxycore against direct, nginx and FastAPI+httpx, side by side.",
    )
    p.add_argument(
        "--quick", action="store_true", help="short run (< 2 min): no 10k streams, 64 MiB reader"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the smallest sizes, for the CI smoke test (overrides --quick); < 1 min",
    )
    p.add_argument(
        "--scenarios",
        type=_csv(SCENARIOS, "scenario"),
        default=SCENARIOS,
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        type=_csv(WORKLOADS, "workload"),
        default=WORKLOADS,
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every workload N times")
    p.add_argument("--duration", type=float, help="seconds for the small-request rps rows")
    p.add_argument(
        "--stream-rate",
        type=float,
        help="streams started per second in the streams workload (default 500; lower it "
        "when the load core is shared)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the results")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk rows")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--keep-tmp", action="store_true", help="keep the logs and configs")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if any scenario or measurement failed"
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="also measure --workers 2 against one worker (issue 16 target 6, unpinned: "
        "bench/scale.py), after the workloads",
    )
    p.add_argument(
        "--soak",
        action="store_true",
        help="run the fault soak instead (bench/soak.py; its options: python -m bench --soak "
        "--help)",
    )
    return p


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.duration is not None:
        sizes = replace(sizes, small_duration=args.duration)
    if args.stream_rate is not None:
        sizes = replace(sizes, stream_open_rate=args.stream_rate)
    return sizes


def _log(t0: float, message: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Run:
    """The state of one invocation: processes, results, and the clean-up of both."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = _sizes(args)
        self.names: tuple[str, ...] = args.scenarios
        self.t0 = time.monotonic()
        self.pinning = Pinning.detect(enabled=not args.no_pin)
        self.wrk = None if args.no_wrk else find_wrk()
        self.tmp = Path(tempfile.mkdtemp(prefix="proxycore-bench-"))
        self.upstream: Child | None = None
        self.fast_upstream: Child | None = None
        self.running: dict[str, Running] = {}
        self.status: dict[str, str] = {}
        self.description: dict[str, str] = {}
        self.rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.notes: list[str] = []
        self.busy_before: list[float] = []
        self.ctx: StartContext | None = None
        self.base_fds: dict[str, int] = {}
        self.restarted: set[str] = set()
        self.meter = Meter(self.pinning, self.tmp, env=child_env(), wrk=self.wrk)

    def log(self, message: str) -> None:
        _log(self.t0, message)

    def start(self) -> int:
        self.busy_before = busy_cores()
        for core, busy in enumerate(self.busy_before):
            if busy > 25.0:
                self.notes.append(
                    f"Core {core} was {busy:.0f}% busy with other processes before the bench "
                    "started anything: figures measured there are unreliable."
                )
                self.log(self.notes[-1])
        self.log(f"upstream (pinning: {self.pinning.note})")
        self.upstream, port = start_upstream(self.tmp, self.pinning)
        self.base_fds["upstream"] = _fds(self.upstream.pid) or 0
        self.fast_upstream, fast_port = start_upstream(self.tmp, self.pinning, fast=True)
        self.ctx = StartContext(port, self.tmp, self.pinning, fast_port)
        for name in self.names:
            reason = unavailable_reason(name)
            if reason is not None:
                self.status[name] = f"skipped: {reason}"
                self.log(f"{name}: {self.status[name]}")
                continue
            try:
                self._start_one(name)
            except (StartError, OSError) as exc:
                self.status[name] = f"failed: {_short(exc)}"
            else:
                self.status[name] = "ok"
            self.log(f"{name}: {self.status[name]}")
        return port

    def _start_one(self, name: str) -> None:
        assert self.ctx is not None
        target = start_scenario(self.ctx, name)
        self.running[name] = target
        self.description[name] = target.description
        if target.measured_pid is not None:
            self.base_fds[name] = _fds(target.measured_pid) or 0

    def settle(self, name: str, case: Case) -> None:
        """Wait until the process under ``name`` has closed what ``case`` left open.

        A proxy still holding connections after SETTLE_S seconds (a slow one still
        working through thousands of abandoned streams) is restarted, so the next case
        measures it fresh; the upstream is only waited for.
        """
        target = self.running.get(name)
        if target is None or self.upstream is None:
            return
        pid = target.measured_pid
        key, role = (name, "proxy") if pid is not None else ("upstream", "upstream")
        if pid is None:
            pid = self.upstream.pid
        limit = self.base_fds.get(key, 0) + SETTLED_EXTRA_FDS[role]
        deadline = time.monotonic() + SETTLE_S
        while True:
            fds = _fds(pid)
            if fds is None or fds <= limit:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        extra = fds - self.base_fds.get(key, 0)
        if role == "upstream":
            self.notes.append(
                f"The upstream still held {extra} extra fds {SETTLE_S:g} s after {case.id} "
                f"({name}): the next rows may be slowed by it."
            )
            self.log(self.notes[-1])
            return
        self.notes.append(
            f"`{name}` still held {extra} extra fds {SETTLE_S:g} s after {case.id}: "
            "restarted it for the rows after that."
        )
        self.log(self.notes[-1])
        target.stop()
        del self.running[name]
        try:
            self._start_one(name)
        except (StartError, OSError) as exc:
            self.status[name] = f"failed: restart after {case.id}: {_short(exc)}"
            self.log(f"{name}: {self.status[name]}")

    def restart_after_death(self, name: str, case: Case, exc: BaseException) -> None:
        """Start a scenario that died once more (once per run), for the later cases."""
        died = f"died during {case.id}: {_short(exc)}"
        if name in self.restarted:
            self.status[name] = f"failed: {died} (again)"
            return
        self.restarted.add(name)
        try:
            self._start_one(name)
        except (StartError, OSError) as start_exc:
            self.status[name] = f"failed: {died}; restart failed: {_short(start_exc)}"
            return
        self.notes.append(f"`{name}` {died}; restarted it for the rows after that.")
        self.log(self.notes[-1])

    def measure(self, case: Case, name: str, meter: Meter) -> dict[str, Any]:
        if case.skip:
            return {"status": f"skipped: {case.skip}", "metrics": {}}
        target = self.running.get(name)
        if target is not None and case.fresh and target.child is not None:
            target.stop()
            del self.running[name]
            try:
                self._start_one(name)
            except (StartError, OSError) as exc:
                self.status[name] = f"failed: restart before {case.id}: {_short(exc)}"
            target = self.running.get(name)
        if target is None:
            return {"status": self.status[name], "metrics": {}}
        try:
            for up in (self.upstream, self.fast_upstream):
                if up is not None and not up.alive():
                    raise MeasureError(f"the {up.name} died: {up.describe_exit()}")
            target.check_alive()
            m: Measurement = case.run(meter, target)
        except Exception as exc:
            if not isinstance(exc, _MEASURE_ERRORS):  # a bug: keep the traceback
                traceback.print_exc(file=sys.stderr)
            entry = {"status": f"failed: {_short(exc)}", "metrics": {}}
            if target.child is not None and not target.child.alive():
                target.stop()
                del self.running[name]
                self.restart_after_death(name, case, exc)
            return entry
        return {
            "status": "ok",
            "metrics": m.metrics,
            "steal_pct": m.steal_pct,
            "dist": m.dist,
            "loadgen": m.loadgen,
        }

    def run_cases(self, upstream_pid: int, upstream_port: int) -> list[Case]:
        meter = self.meter
        cases = build_cases(
            self.sizes,
            upstream_pid=upstream_pid,
            upstream_port=upstream_port,
            wrk=self.wrk is not None,
            workloads=self.args.workloads,
        )
        rounds = self.args.rounds
        for rnd in range(rounds):
            # Each round starts the scenarios at a different one, so drift over a case
            # does not always favour the same scenario.
            shift = rnd % len(self.names)
            order = self.names[shift:] + self.names[:shift]
            for index, case in enumerate(cases):
                last = rnd == rounds - 1 and all(c.skip for c in cases[index + 1 :])
                this_round: dict[str, dict[str, Any]] = {}
                for name in order:
                    entry = self.measure(case, name, meter)
                    this_round[name] = entry
                    if not case.skip:
                        self.log(f"round {rnd + 1} {case.id} {name}: {entry['status']}")
                        if not last:
                            self.settle(name, case)
                add_relative(case, this_round)
                for name, entry in this_round.items():
                    self.rounds.setdefault(case.id, {}).setdefault(name, []).append(entry)
        return cases

    def stop(self) -> None:
        self.meter.close()
        for target in self.running.values():
            target.stop()
        self.running.clear()
        for up in (self.upstream, self.fast_upstream):
            if up is not None:
                up.stop()
        if self.args.keep_tmp:
            print(f"logs and configs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def document(
        self, cases: list[Case], started: dt.datetime, steal_pct: float | None
    ) -> dict[str, Any]:
        workloads: dict[str, dict[str, Any]] = {w: {} for w in self.args.workloads}
        for case in cases:
            per_scenario = self.rounds.get(case.id, {})
            workloads[case.workload][case.key] = {
                "title": case.title,
                "note": case.note,
                "skip": case.skip,
                "metrics": [asdict(m) for m in case.metrics],
                "scenarios": {
                    name: {
                        **aggregate(per_scenario.get(name, [])),
                        "rounds": [
                            {k: r.get(k) for k in ("status", "metrics", "steal_pct")}
                            for r in per_scenario.get(name, [])
                        ],
                    }
                    for name in self.names
                },
            }
        env = environment(self.pinning, find_nginx(), self.wrk)
        env["busy_before_pct"] = self.busy_before
        if self.pinning.method == "none":
            self.notes.append(f"Not pinned: {self.pinning.note}.")
        if self.wrk is None:
            self.notes.append(
                "wrk not found (or --no-wrk): only the Python load generator measured rps, and "
                "it may saturate before a fast proxy does."
            )
        self.notes += [
            "The Python load generator (proxycore.tools.loadgen, one process) shares a core with "
            "the hypercorn upstream: `direct` is the ceiling of every rps row, and a fast "
            "proxy can look no faster than the generator.",
            "proxycore runs with its defaults: 32 idle upstream connections per origin, "
            "max_connections 10,000; nginx keeps 64.",
            "`GET /small` (small and ttfb rows) goes to a canned-response upstream "
            "(`bench.fast_upstream`, tens of thousands of requests/s on the load core) so "
            "the hypercorn sim does not cap those rows; every proxy routes that one path there.",
            "Every round measures the scenarios in a rotated order (round r starts at the "
            "r-th scenario).",
        ]
        return {
            "schema": 1,
            "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "mode": self.sizes.name,
            "rounds": self.args.rounds,
            "duration_s": time.monotonic() - self.t0,
            "argv": sys.argv[1:],
            "sizes": asdict(self.sizes),
            "environment": env,
            "steal_pct": steal_pct,
            "skipped": list(self.sizes.skipped),
            "scenarios": {
                name: {
                    "status": self.status.get(name, "failed: not started"),
                    "description": self.description.get(name, ""),
                }
                for name in self.names
            },
            "workloads": workloads,
            "notes": self.notes,
        }


def _scale(args: argparse.Namespace) -> dict[str, Any]:
    """Target 6's measurement (bench/scale.py), or why it could not run."""
    from bench.scale import report, run_rounds

    duration = 2 if args.tiny else 4 if args.quick else 10
    # The runner pinned itself to the load core, and children inherit that: the scale
    # runs are unpinned, on every core.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        runs = run_rounds(args.rounds, duration)
    except (RuntimeError, StartError, OSError) as exc:
        return {"result": f"n/a: {_short(exc)}"}
    _, doc = report(runs, len(os.sched_getaffinity(0)), 2, 100, duration)
    return doc


def _fds(pid: int) -> int | None:
    try:
        return psutil.Process(pid).num_fds()
    except (psutil.Error, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--soak" in argv:  # the fault soak has its own options (bench/soak.py)
        from bench.soak import main as soak_main

        return soak_main([a for a in argv if a != "--soak"])
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    for flag in ("duration", "stream_rate"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            print(f"--{flag.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = dt.datetime.now(dt.UTC)
    run = _Run(args)
    run.pinning.pin_self()
    steal = StealMeter()
    steal.start()
    cases: list[Case] = []
    try:
        try:
            port = run.start()
        except (StartError, OSError) as exc:
            print(f"bench: the upstream did not start: {_short(exc, 1000)}", file=sys.stderr)
            return 2
        assert run.upstream is not None
        cases = run.run_cases(run.upstream.pid, port)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything (no report)", file=sys.stderr)
        return 130
    finally:
        run.stop()
        signal.signal(signal.SIGTERM, previous)
    doc = compact(run.document(cases, started, steal.stop()))
    if args.scale:
        doc["scale"] = _scale(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / started.strftime("%Y%m%dT%H%M%SZ")
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if not args.no_chart:
        problem = render_chart(doc, stem.with_suffix(".png"))
        if problem:
            doc["notes"].append(problem)
        else:
            doc["chart"] = stem.with_suffix(".png").name
        json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    markdown = render_markdown(doc)
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print_markdown(markdown)
    print(f"wrote {json_path} (+ .md{'' if args.no_chart else ', .png'})", file=sys.stderr)
    failed = failures(doc)
    if failed and args.strict:
        print("failures:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
