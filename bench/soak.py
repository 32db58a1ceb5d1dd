"""Fault soak: mixed traffic through one proxycore process against upstreams and clients that
misbehave on purpose, then checks that the proxy logged what its clients saw and went back
to where it started (issue 12).

``python -m bench --soak [--minutes N]`` (default 2) or ``python -m bench.soak``; ``--seconds
S`` for a short run (the test suite runs 20 s), ``--out PATH`` for the JSON report (a ``.json``
file, or a directory), ``--cases a,b`` to run only some cases (a finding alone), ``--seed``,
``--clients``, ``--no-pin``, ``--keep-tmp``, ``--work-dir``. Exit status 0 when every check
passed, 1 when one failed, 2 when the proxy did not start.

Modules: this one (config, proxy process, phases, report), :mod:`bench.soak_client` (the
cases and the raw-socket clients), :mod:`bench.soak_checks` (the checks below),
:mod:`bench.soak_upstream` (the upstream).

What runs
---------
* **One proxy**: ``python -m proxycore serve --config <generated toml>`` (pinned to its own
  core like the bench's proxies), listening on ``127.0.0.1:0`` (the port is read from its
  log), its stderr (the JSON access log and every other log line) in ``proxy.log``. A route
  per misbehaviour (``/ok/``, ``/trickle/``, ``/reset/``, ``/stall/``, ``/bad/``,
  ``/close/``, ``/early/``, ``/limit/`` with ``max_body_bytes``), three event-stream routes
  (``/sse/``: heartbeat, in-band errors and a transcript; ``/sse-cut/``: heartbeat and a
  transcript, errors off; ``/sse-plain/``: no features) and a WebSocket route (``/ws/``).
  Short timeouts so that every misbehaviour ends within seconds and idle connections close
  quickly (``keepalive_timeout`` 1 s, pool ``idle_timeout`` 1 s, ``idle`` 1 s, ``response``
  3 s); ``[timeouts] send`` and ``client_body`` (1 s each) only if proxycore's ``Timeouts``
  has those fields (the report says which).
* **One upstream** (:mod:`bench.soak_upstream`, raw trio sockets, in this process): resets
  and FINs before and in the middle of bodies, stalls, malformed status lines, headers,
  chunk framing and event streams, 413 and 200 answers before the request body, trickles,
  half SSE events, absurd ``retry:`` and ``id:`` fields, WebSocket peers that vanish, plus
  well-behaved small, chunked, close-delimited, upload, SSE and WebSocket endpoints.
* **Clients** (raw trio sockets, in this process): each sends a fresh ``X-Request-ID``
  (``soak-<tag>-<n>-<case>``) and records exactly what it observed: the status line (or
  none), every body byte on the wire after the head, whether the body ended by its own
  framing (``clean``), by a close the framing allows (``close``: HTTP/1.0), or was cut
  (``cut``: EOF or reset before the framing ended, or invalid framing), or whether the
  client itself left first (``left``); SSE events and heartbeats; WebSocket close codes.
  Some clients vanish (before the head, mid-body, mid-upload, mid-session, with FIN or
  RST), stall reading (0.4 s; 2.5 s or 6 s with a 4 KiB receive buffer), trickle uploads
  (fast enough, or too slow), upload then read, or read while uploading.

Phases: warm-up (every case once), idle until the proxy closed what it could (at least 7 s:
the pool sweeps every 5 s), **baseline** (fds from ``/proc/PID/fd``, RSS), N minutes of
random cases on ``--clients`` concurrent slots, the clients in flight finish, idle again,
**after**, then the **canary**, then SIGTERM and the log is read.

What "equal" means (log line ``L`` vs client observation ``C``, matched by request id)
-------------------------------------------------------------------------------------
Outcomes ``complete``, ``websocket_refused`` and ``answered_by_hook`` claim that a whole
response went out ("complete" below); every other outcome claims that it did not.

* ``status_match``: if ``C`` read a status line, ``L.status`` is that status. If ``C`` read
  none although it waited until the connection ended, that is a failure whatever ``L`` says
  (the proxy closed without an answer, or logged one it did not deliver).
* ``outcome_match``: ``C`` ended ``clean`` with a relayed body -> ``L`` is complete; ``C``
  ended ``clean`` with a proxy-made JSON error or an SSE ``event: error`` carrying its
  request id -> ``L`` is not complete; ``C`` was ``cut`` -> ``L`` is not complete; ``C``
  left before reading a head -> ``L`` is not complete (those cases answer after 1 s, long
  after the client left).
* ``vanished_not_complete``: ``C`` left mid-body -> ``L`` is not complete. Those cases read
  32 MiB bodies or endless event streams, far more than the socket buffers hold, so a
  ``complete`` there claims bytes the client never read.
* ``bytes_match``: ``L.bytes_out`` counts body bytes after the head as they go on the wire
  (chunk framing included), like ``C``. ``C`` ended ``clean`` or ``close``, or was ``cut``
  by a FIN -> equal; ``C`` was cut by a reset, or left -> ``L.bytes_out >= C`` (a reset can
  destroy bytes in flight; a client that left read only part of what was sent). A complete
  Content-Length upload to ``/ok/upload`` -> ``L.bytes_in`` is its size.
* ``ws_match``: the exchange line's status is the handshake status ``C`` read; a 101 has one
  ``"type": "websocket"`` session line whose ``client_close_code`` is the close code ``C``
  received; a close handshake ``C`` started with 1000 -> ``websocket_closed`` with the
  message bytes each way equal to ``C``'s; ``C`` left -> ``websocket_client_gone``; ``C`` got
  1011 -> ``websocket_upstream_lost``.
* ``log_line``: one exchange line per request whose head went out, none with an unknown id.
* ``stalled_reader_released``: a client that stopped reading for 6 s had its exchange ended
  (the line's ``time``) at least 1 s before it read again: no write waits unbounded.
* ``transcript_match``: each event stream relayed on a transcript route has one transcript
  line with the logged status and the outcome the log's maps to (``complete``,
  ``client_gone``, ``timeout``, else ``upstream_failed``), with as many events as ``C``
  received when ``C`` ended clean without an error event. ``transcript_bound``: no line keeps
  more than ``transcript_max_bytes`` of event fields (data with its line feeds, type, id).

* ``outcome_blame``: in a case where only the client misbehaves (vanishes, stalls, trickles
  too slowly) ``L`` blames no upstream (``upstream_*``); where only the upstream does, ``L``
  blames no client (``client_gone``, ``client_timeout``). The client can't see this, but the
  soak knows who misbehaved, and metrics and transcripts inherit the outcome.
* ``valid_framing``: no client ever got an invalid head or invalid chunk framing: a cut is
  an EOF (or a reset) after whole chunks, never bytes after a write that was cut midway.

Other checks: ``no_traceback`` (no ``Traceback`` or ``ExceptionGroup`` anywhere in the log),
``fds_return`` (after <= baseline + ``FD_MARGIN``), ``rss_return`` (after <= baseline +
max(``RSS_MARGIN_BYTES``, ``RSS_MARGIN_RATIO`` x baseline)), ``canary``, ``proxy_alive``,
``expected_response`` (each case got the status and ending it is built to provoke, e.g. an
early 413 is read by the client), ``client_deadline`` (no client waited 20 s for an answer
or a cut), ``sse_no_partial_event`` (every ``message`` event a client dispatched is the
upstream's whole JSON, never half of one), ``harness`` (the soak's own code raised nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import psutil
import trio

from bench.env import Pinning
from bench.procs import Child, StartError
from bench.scenarios import REPO_ROOT, child_env
from bench.soak_checks import (
    CHECKS,
    FD_MARGIN,
    RSS_MARGIN_BYTES,
    RSS_MARGIN_RATIO,
    STALL_MARGIN_S,
    TRANSCRIPT_MAX,
    Checks,
    LogData,
    Reading,
    RunFacts,
    evaluate,
    read_log,
)
from bench.soak_client import (
    CANARY,
    CASE_BY_NAME,
    CASES,
    HOST,
    MIB,
    STALL_S,
    Case,
    HttpClient,
    Observation,
    WsClient,
)
from bench.soak_upstream import SoakUpstream

__all__ = ["build_parser", "config_toml", "main"]

#: Idle wait before a baseline/after reading: the pool sweeps every 5 s, pool idle 1 s,
#: keep-alive 1 s. Then wait (up to SETTLE_MAX_S) for the fd count to settle.
SETTLE_MIN_S: Final = 7.0
SETTLE_MAX_S: Final = 30.0
#: The generated config's timeouts (seconds).
KEEPALIVE_S: Final = 1.0
POOL_IDLE_S: Final = 1.0
TIMEOUTS: Final = {"connect": 2.0, "response": 3.0, "idle": 1.0, "total": 0.0}
#: Set only when proxycore's ``Timeouts`` has the field (issue 12's new bounds).
OPTIONAL_TIMEOUTS: Final = {"send": 1.0, "client_body": 1.0}
_LISTENING: Final = re.compile(r"listening on 127\.0\.0\.1:([0-9]+)")


# --------------------------------------------------------------------------- the proxy


def supported_timeouts() -> list[str]:
    """Which of issue 12's new ``[timeouts]`` fields proxycore's ``Timeouts`` has."""
    from proxycore.config.model import Timeouts

    names = {f.name for f in dataclasses.fields(Timeouts)}
    return [name for name in OPTIONAL_TIMEOUTS if name in names]


def config_toml(up_port: int, transcript: Path, optional: Sequence[str]) -> str:
    up = f"http://{HOST}:{up_port}"
    timeouts = dict(TIMEOUTS) | {name: OPTIONAL_TIMEOUTS[name] for name in optional}
    lines = [
        "# generated by bench/soak.py",
        "[server]",
        f'listen = "{HOST}:0"',
        f"keepalive_timeout = {KEEPALIVE_S}",
        "header_timeout = 5.0",
        "shutdown_grace = 2.0",
        "",
        "[timeouts]",
        *(f"{name} = {value}" for name, value in timeouts.items()),
        "",
        "[pool]",
        "max_idle_per_origin = 16",
        f"idle_timeout = {POOL_IDLE_S}",
    ]
    sse_on = (
        f'{{ heartbeat = 0.25, errors = true, transcript = "{transcript}", '
        f"transcript_max_bytes = {TRANSCRIPT_MAX} }}"
    )
    sse_cut = (
        f'{{ heartbeat = 0.25, transcript = "{transcript}", '
        f"transcript_max_bytes = {TRANSCRIPT_MAX} }}"
    )
    routes: list[tuple[str, str, list[str]]] = [
        ("/ok/", f"{up}/ok/", []),
        ("/trickle/", f"{up}/trickle/", []),
        ("/reset/", f"{up}/reset/", []),
        ("/stall/", f"{up}/stall/", []),
        ("/bad/", f"{up}/bad/", []),
        ("/close/", f"{up}/close/", []),
        ("/early/", f"{up}/early/", []),
        ("/limit/", f"{up}/ok/", ["max_body_bytes = 65536"]),
        ("/sse/", f"{up}/sse/", ['accept_encoding = "identity"', f"sse = {sse_on}"]),
        ("/sse-cut/", f"{up}/sse/", [f"sse = {sse_cut}"]),
        ("/sse-plain/", f"{up}/sse/", []),
        (
            "/ws/",
            f"ws://{HOST}:{up_port}/ws/",
            [
                "websocket = true",
                "ws = { ping_interval = 0.4, ping_timeout = 1.0, max_message_bytes = 1048576 }",
            ],
        ),
    ]
    for prefix, upstream, extra in routes:
        lines += ["", "[[routes]]", f'prefix = "{prefix}"', f'upstream = "{upstream}"', *extra]
    return "\n".join(lines) + "\n"


def start_proxy(work: Path, config: Path, pinning: Pinning) -> tuple[Child, int]:
    """``proxycore serve --config``; the port it bound, from its log."""
    argv = [*pinning.prefix("proxy"), sys.executable, "-m", "proxycore", "serve"]
    argv += ["--config", str(config)]
    log_path = work / "proxy.log"
    child = Child("proxycore", argv, log_path=log_path, env=child_env(), cwd=REPO_ROOT)
    deadline = time.monotonic() + 30.0
    try:
        while True:
            m = _LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
            if m is not None:
                return child, int(m[1])
            if not child.alive():
                raise StartError(child.describe_exit())
            if time.monotonic() > deadline:
                raise StartError(f"no 'listening on' line after 30 s: {child.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        child.stop()
        raise


# --------------------------------------------------------------------------- the run


class Soak:
    """One run: the upstream, the clients, the readings (the proxy is started outside)."""

    def __init__(
        self, args: argparse.Namespace, pid: int, port: int, listener: socket.socket
    ) -> None:
        self.args = args
        self.pid, self.port = pid, port
        self.listener = listener
        self.proc = psutil.Process(pid)
        self.upstream = SoakUpstream()
        self.rng = random.Random(args.seed)
        self.tag = f"{args.seed:x}{os.getpid() % 4096:03x}"
        self.seq = 0
        self.facts = RunFacts()
        self.phase_s: dict[str, float] = {}
        self.exchanges = {"warmup": 0, "run": 0}

    def rid(self, case: Case) -> str:
        self.seq += 1
        return f"soak-{self.tag}-{self.seq:06d}-{case.name}"

    def fds(self) -> int:
        try:
            return self.proc.num_fds()
        except psutil.Error:
            return -1

    def rss(self) -> int:
        try:
            return int(self.proc.memory_info().rss)
        except psutil.Error:
            return -1

    async def sample(self) -> None:
        while True:
            facts = self.facts
            facts.peak_fds = max(facts.peak_fds, self.fds())
            facts.peak_rss = max(facts.peak_rss, self.rss())
            await trio.sleep(0.25)

    async def run_case(self, case: Case, phase: str) -> list[Observation]:
        try:
            if case.kind == "ws":
                got = await WsClient(case, self.port, self.rid(case), phase).run()
            else:
                rids = [self.rid(case) for _ in range(case.repeat)]
                if case.repeat > 1:
                    rids = [f"{rids[0]}-k{i}" for i in range(case.repeat)]
                got = await HttpClient(case, self.port, rids, phase).run()
        except Exception:
            self.facts.harness_errors.append(f"client {case.name}: {traceback.format_exc()}")
            return []
        self.facts.observations.extend(got)
        if phase in self.exchanges:
            self.exchanges[phase] += len(got)
        return got

    async def ready(self) -> None:
        for attempt in range(100):
            rid = f"soak-ready-{attempt}"
            self.facts.harness_ids.add(rid)
            client = HttpClient(CANARY, self.port, [rid], "ready")
            try:
                got = await client.run()
            except OSError:
                got = []
            if got and got[0].status == 200 and got[0].end == "clean":
                return
            await trio.sleep(0.1)
        raise StartError("the proxy never answered GET /ok/small")

    async def settle(self, target: int | None) -> Reading:
        """Wait until idle: SETTLE_MIN_S, then until the fd count is <= ``target`` (or, for
        the baseline, unchanged for 1 s); at most SETTLE_MAX_S more."""
        start = trio.current_time()
        await trio.sleep(SETTLE_MIN_S)
        deadline = trio.current_time() + SETTLE_MAX_S
        last, stable_since = self.fds(), trio.current_time()
        while trio.current_time() < deadline:
            await trio.sleep(0.25)
            now, current = trio.current_time(), self.fds()
            if target is not None and current <= target:
                last = current
                break
            if current != last:
                last, stable_since = current, now
            elif target is None and now - stable_since >= 1.0:
                break
        return Reading(fds=last, rss=self.rss(), waited_s=trio.current_time() - start)

    async def warmup(self) -> None:
        limiter = trio.CapacityLimiter(self.args.clients)

        async def one(case: Case) -> None:
            async with limiter:
                await self.run_case(case, "warmup")

        async with trio.open_nursery() as nursery:
            for case in self.args.cases:
                nursery.start_soon(one, case)

    async def traffic(self, seconds: float) -> None:
        until = trio.current_time() + seconds
        cases: list[Case] = list(self.args.cases)
        weights = [case.weight for case in cases]

        async def slot() -> None:
            while trio.current_time() < until:
                case = self.rng.choices(cases, weights)[0]
                await self.run_case(case, "run")

        async with trio.open_nursery() as nursery:
            for _ in range(self.args.clients):
                nursery.start_soon(slot)

    async def drive(self) -> None:
        async with trio.open_nursery() as nursery:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener))
            nursery.start_soon(trio.serve_listeners, self.upstream.connection, [listener])
            nursery.start_soon(self.sample)
            t = trio.current_time()
            await self.ready()
            await self.warmup()
            self.phase_s["warmup"] = trio.current_time() - t
            _log(f"warm-up: {self.exchanges['warmup']} exchanges; waiting for idle")
            facts = self.facts
            facts.baseline = await self.settle(None)
            _log(
                f"baseline: {facts.baseline.fds} fds, {_mib(facts.baseline.rss)} RSS; "
                f"{self.args.duration:g} s of traffic on {self.args.clients} clients"
            )
            t = trio.current_time()
            await self.traffic(self.args.duration)
            self.phase_s["run"] = trio.current_time() - t
            _log(f"traffic: {self.exchanges['run']} exchanges; waiting for idle")
            facts.after = await self.settle(facts.baseline.fds + FD_MARGIN)
            _log(f"after: {facts.after.fds} fds, {_mib(facts.after.rss)} RSS; canary")
            facts.harness_ids.add("soak-canary")
            try:
                got = await HttpClient(CANARY, self.port, ["soak-canary"], "canary").run()
                facts.canary = got[0] if got else None
            except OSError as exc:
                facts.canary = Observation("soak-canary", "canary", "canary", how=str(exc))
            nursery.cancel_scope.cancel()
        self.facts.harness_errors += [f"upstream: {e}" for e in self.upstream.errors]


# --------------------------------------------------------------------------- the report


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _counts(counter: Counter[str], width: int) -> str:
    text = " ".join(f"{k}x{v}" for k, v in counter.most_common())
    return text if len(text) <= width else text[: width - 3] + "..."


def case_table(soak: Soak, log: LogData, checks: Checks) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for obs in soak.facts.observations:
        if obs.phase not in ("warmup", "run"):
            continue
        row = rows.setdefault(
            obs.case,
            {
                "case": obs.case,
                "runs": 0,
                "status": Counter(),
                "end": Counter(),
                "outcome": Counter(),
            },
        )
        row["runs"] += 1
        row["status"][str(obs.status)] += 1
        row["end"][obs.end or "-"] += 1
        lines = log.exchanges.get(obs.rid, [])
        sessions = log.sessions.get(obs.rid, [])
        outcome = (sessions or lines or [{}])[0].get("outcome", "(no line)")
        row["outcome"][str(outcome)] += 1
    out = []
    for case in CASES:
        found = rows.get(case.name)
        if found is not None:
            found["failures"] = checks.per_case.get(case.name, 0)
            out.append(found)
    return out


def render(soak: Soak, log: LogData, checks: Checks, optional: Sequence[str]) -> str:
    args = soak.args
    timeouts = dict(TIMEOUTS) | {n: OPTIONAL_TIMEOUTS[n] for n in optional}
    missing = [n for n in OPTIONAL_TIMEOUTS if n not in optional]
    lines = [
        "",
        f"proxycore fault soak: {args.duration:g} s of traffic on {args.clients} clients, "
        f"seed {args.seed}; {soak.exchanges['run']} exchanges (+ {soak.exchanges['warmup']} "
        "warm-up)",
        "timeouts: "
        + ", ".join(f"{k}={v:g}" for k, v in timeouts.items())
        + f"; keepalive {KEEPALIVE_S:g} s, pool idle {POOL_IDLE_S:g} s"
        + (f" (not in proxycore's Timeouts yet: {', '.join(missing)})" if missing else ""),
        "",
    ]
    header = (
        f"{'case':<22} {'runs':>5} {'fail':>4}  {'client status':<18} {'client end':<22} "
        "log outcome"
    )
    lines += [header, "-" * len(header)]
    for row in case_table(soak, log, checks):
        lines.append(
            f"{row['case']:<22} {row['runs']:>5} {row['failures']:>4}  "
            f"{_counts(row['status'], 18):<18} {_counts(row['end'], 22):<22} "
            f"{_counts(row['outcome'], 60)}"
        )
    lines += ["", f"{'check':<25} {'result':<6} detail", "-" * 100]
    for name in CHECKS:
        failures = checks.failures[name]
        result = "SKIP" if name in checks.skipped else ("FAIL" if failures else "PASS")
        detail = checks.skipped.get(name) or checks.detail[name] or CHECKS[name]
        if failures:
            examples = checks.examples[name]
            first = examples[0]["message"].splitlines()[0] if examples else ""
            detail = f"{failures} failure(s); first: {first[:160]}"
        lines.append(f"{name:<25} {result:<6} {detail}")
    failed = [n for n in CHECKS if checks.failures[n]]
    lines += ["", f"RESULT: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}"]
    return "\n".join(lines) + "\n"


def render_failures(checks: Checks, limit: int = 3) -> str:
    out: list[str] = []
    for name in CHECKS:
        examples = checks.examples[name][:limit]
        if not examples:
            continue
        out.append(f"\n== {name}: {checks.failures[name]} failure(s); first {len(examples)}:")
        for example in examples:
            out.append(f"- {example['message']}")
            client = example.get("client")
            if client is not None:
                keep = (
                    "rid",
                    "case",
                    "status",
                    "end",
                    "how",
                    "left",
                    "body_bytes",
                    "declared",
                    "sent_body",
                    "upload_done",
                    "upload_error",
                    "events",
                    "error_events",
                    "ws_close",
                    "stalled_at",
                    "resumed_at",
                    "ended",
                    "notes",
                )
                out.append("  client: " + json.dumps({k: client.get(k) for k in keep}))
            if "log" in example:
                out.append("  log:    " + json.dumps(example["log"]))
    return "\n".join(out) + ("\n" if out else "")


def document(
    soak: Soak, log: LogData, checks: Checks, optional: Sequence[str], started: dt.datetime
) -> dict[str, Any]:
    return {
        "schema": 1,
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": soak.args.duration,
        "clients": soak.args.clients,
        "seed": soak.args.seed,
        "exchanges": soak.exchanges,
        "phases_s": {k: round(v, 1) for k, v in soak.phase_s.items()},
        "config": {
            "timeouts": dict(TIMEOUTS) | {n: OPTIONAL_TIMEOUTS[n] for n in optional},
            "missing_timeouts": [n for n in OPTIONAL_TIMEOUTS if n not in optional],
            "keepalive_timeout": KEEPALIVE_S,
            "pool_idle_timeout": POOL_IDLE_S,
            "transcript_max_bytes": TRANSCRIPT_MAX,
        },
        "margins": {
            "fds": FD_MARGIN,
            "rss_bytes": RSS_MARGIN_BYTES,
            "rss_ratio": RSS_MARGIN_RATIO,
            "stall_s": STALL_S,
            "stall_margin_s": STALL_MARGIN_S,
        },
        "readings": {
            "baseline": dataclasses.asdict(soak.facts.baseline),
            "after": dataclasses.asdict(soak.facts.after),
            "peak_fds": soak.facts.peak_fds,
            "peak_rss": soak.facts.peak_rss,
        },
        "checks": {
            name: {
                "ok": checks.ok(name),
                "failures": checks.failures[name],
                "what": CHECKS[name],
                "detail": checks.skipped.get(name) or checks.detail[name],
                "examples": checks.examples[name],
            }
            for name in CHECKS
        },
        "cases": {
            row["case"]: {
                "runs": row["runs"],
                "failures": row["failures"],
                "status": dict(row["status"]),
                "end": dict(row["end"]),
                "outcome": dict(row["outcome"]),
            }
            for row in case_table(soak, log, checks)
        },
        "upstream_requests": dict(soak.upstream.requests),
        "ok": all(checks.ok(name) for name in CHECKS),
    }


# --------------------------------------------------------------------------- main


def _case_list(text: str) -> tuple[Case, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASE_BY_NAME or n == CANARY.name]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(case.name for case in CASES)
        )
    return tuple(CASE_BY_NAME[n] for n in dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench --soak",
        description="Fault soak: misbehaving upstreams and clients through one proxycore.",
    )
    p.add_argument("--minutes", type=float, default=2.0, help="minutes of traffic (default 2)")
    p.add_argument("--seconds", type=float, help="seconds of traffic (overrides --minutes)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seed", type=int, default=1, help="case order (default 1)")
    p.add_argument(
        "--cases",
        type=_case_list,
        default=CASES,
        help="comma-separated case names (default: all; to reproduce one finding alone)",
    )
    p.add_argument("--out", type=Path, help="write the JSON report (a .json file or a directory)")
    p.add_argument("--work-dir", type=Path, help="keep config and logs here (default: a tmp dir)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the tmp dir (config, logs)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the proxy to its own core")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.duration = args.seconds if args.seconds is not None else args.minutes * 60.0
    if not args.duration > 0 or args.clients < 1:
        print("--minutes/--seconds must be > 0 and --clients >= 1", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    pinning = Pinning.detect(enabled=not args.no_pin)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="proxycore-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    optional = supported_timeouts()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(1024)
    up_port = int(listener.getsockname()[1])
    transcript = work / "transcript.jsonl"
    config = work / "soak.toml"
    config.write_text(config_toml(up_port, transcript, optional), encoding="utf-8")
    _log(f"work dir {work}; {pinning.note}")
    try:
        proxy, port = start_proxy(work, config, pinning)
    except (StartError, OSError) as exc:
        print(f"soak: the proxy did not start: {exc}", file=sys.stderr)
        listener.close()
        return 2
    pinning.pin_self()
    soak = Soak(args, proxy.pid, port, listener)
    _log(f"proxy pid {proxy.pid} on {HOST}:{port}, upstream on {HOST}:{up_port}")
    try:
        trio.run(soak.drive)
        soak.facts.alive = proxy.alive()
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    except StartError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    finally:
        proxy.stop()
        listener.close()
    code = proxy.popen.returncode
    soak.facts.proxy_exit = "still running" if code is None else f"exit status {code}"
    log = read_log(work / "proxy.log")
    checks = evaluate(soak.facts, log, transcript)
    print(render(soak, log, checks, optional), end="")
    failures = render_failures(checks)
    if failures:
        print(failures, end="")
    ok = all(checks.ok(name) for name in CHECKS)
    if args.out is not None:
        out = args.out
        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = document(soak, log, checks, optional, started)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
        _log(f"wrote {out}")
    if args.work_dir is None and not args.keep_tmp and ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        _log(f"config and proxy log kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
