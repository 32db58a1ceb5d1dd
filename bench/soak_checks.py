"""The fault soak's checks: the proxy's log and transcript against what each client saw
(the rules are in :mod:`bench.soak`'s docstring), and the readings of the proxy process.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.soak_client import CASE_BY_NAME, DEADLINE_S, STALL_S, Case, Observation

__all__ = [
    "CHECKS",
    "FD_MARGIN",
    "RSS_MARGIN_BYTES",
    "RSS_MARGIN_RATIO",
    "TRANSCRIPT_MAX",
    "Checks",
    "LogData",
    "Reading",
    "RunFacts",
    "evaluate",
    "read_log",
]

#: Open fds after the run (idle) may exceed the baseline by this many.
FD_MARGIN: Final = 2
#: RSS after the run (idle) may exceed the baseline by max(these two).
RSS_MARGIN_BYTES: Final = 8 << 20
RSS_MARGIN_RATIO: Final = 0.10
#: A client stalled STALL_S: the proxy must have ended the exchange this long before it
#: read again.
STALL_MARGIN_S: Final = 1.0
#: The transcript routes' transcript_max_bytes.
TRANSCRIPT_MAX: Final = 64 * 1024
#: Outcomes that claim a whole response went out.
COMPLETE: Final = frozenset({"complete", "websocket_refused", "answered_by_hook"})
#: The transcript outcome for each access-log outcome (the rest: upstream_failed).
TRANSCRIPT_OUTCOMES: Final = {
    "complete": "complete",
    "client_gone": "client_gone",
    "upstream_timeout": "timeout",
}

CHECKS: Final = {
    "no_traceback": "no Traceback or ExceptionGroup in the proxy's log (its stderr)",
    "proxy_alive": "the proxy ran until the soak stopped it",
    "fds_return": f"open fds after the run, idle, <= baseline + {FD_MARGIN}",
    "rss_return": (
        f"RSS after the run, idle, <= baseline + max({RSS_MARGIN_BYTES >> 20} MiB, "
        f"{RSS_MARGIN_RATIO:.0%})"
    ),
    "canary": "GET /ok/small at the end: 200 with its 100 bytes, logged complete",
    "log_line": "one access line per request that reached the proxy, none unknown",
    "status_match": "logged status == status the client read; a waiting client read one",
    "outcome_match": "logged complete <=> the client read a whole non-error response",
    "vanished_not_complete": "a client that left mid-body is never logged complete",
    "bytes_match": "bytes_out == body bytes the client read (>= after a reset or leaving)",
    "outcome_blame": "a failure only the client caused is not logged as the upstream's (and back)",
    "ws_match": "WebSocket lines: close code the client got, outcome, message bytes",
    "valid_framing": "no client got an invalid head or chunk framing (a cut is EOF, not garbage)",
    "expected_response": "each case got the status and ending it is built to provoke",
    "client_deadline": f"no client waited {DEADLINE_S:g} s for an answer or a cut",
    "stalled_reader_released": (
        f"a client stalled {STALL_S:g} s: exchange ended >= {STALL_MARGIN_S:g} s before it "
        "read again"
    ),
    "sse_no_partial_event": "no client dispatched half an SSE event",
    "transcript_match": "one transcript line per relayed stream: status, outcome, events",
    "transcript_bound": f"no transcript line keeps more than {TRANSCRIPT_MAX} bytes of events",
    "harness": "the soak's own upstream and clients raised nothing unexpected",
}


# --------------------------------------------------------------------------- the checks


@dataclass
class Reading:
    """The proxy process, idle: open fds and RSS, and how long the wait for idle took."""

    fds: int = 0
    rss: int = 0
    waited_s: float = 0.0


@dataclass
class RunFacts:
    """What the run knows besides the log: the clients' observations and the readings."""

    observations: list[Observation] = field(default_factory=list)
    #: Request ids the harness itself used (readiness probes, the canary).
    harness_ids: set[str] = field(default_factory=set)
    harness_errors: list[str] = field(default_factory=list)
    baseline: Reading = field(default_factory=Reading)
    after: Reading = field(default_factory=Reading)
    peak_fds: int = 0
    peak_rss: int = 0
    canary: Observation | None = None
    alive: bool = True
    proxy_exit: str = ""


@dataclass
class LogData:
    exchanges: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)
    bad_json: list[str] = field(default_factory=list)
    lines: int = 0


def read_log(path: Path) -> LogData:
    data = LogData()
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    data.lines = len(lines)
    for index, line in enumerate(lines):
        if "Traceback" in line or "ExceptionGroup" in line:
            excerpt = "\n".join(lines[max(0, index - 2) : index + 25])
            if not data.tracebacks or excerpt not in data.tracebacks[-1]:
                data.tracebacks.append(excerpt)
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                data.bad_json.append(line[:200])
                continue
            rid = str(doc.get("request_id", ""))
            target = data.sessions if doc.get("type") == "websocket" else data.exchanges
            target.setdefault(rid, []).append(doc)
        elif line.startswith("proxycore "):
            parts = line.split(" ", 3)
            data.other[" ".join(parts[1:3])] += 1
    return data


def read_transcripts(path: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    out: dict[str, list[dict[str, Any]]] = {}
    bad: list[str] = []
    if not path.exists():
        return out, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            bad.append(line[:200])
            continue
        out.setdefault(str(doc.get("request_id", "")), []).append(doc)
    return out, bad


class Checks:
    """Failures per check, with the first few examples of each."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = dict.fromkeys(CHECKS, 0)
        self.examples: dict[str, list[dict[str, Any]]] = {name: [] for name in CHECKS}
        self.detail: dict[str, str] = dict.fromkeys(CHECKS, "")
        self.skipped: dict[str, str] = {}
        self.per_case: Counter[str] = Counter()

    def fail(
        self,
        name: str,
        message: str,
        obs: Observation | None = None,
        line: dict[str, Any] | None = None,
    ) -> None:
        self.failures[name] += 1
        if obs is not None:
            self.per_case[obs.case] += 1
        if len(self.examples[name]) < 8:
            example: dict[str, Any] = {"message": message}
            if obs is not None:
                example["client"] = obs.as_dict()
            if line is not None:
                example["log"] = line
            self.examples[name].append(example)

    def ok(self, name: str) -> bool:
        return self.failures[name] == 0 and name not in self.skipped


def _complete(line: dict[str, Any]) -> bool:
    return line.get("outcome") in COMPLETE


def check_http(checks: Checks, obs: Observation, line: dict[str, Any]) -> None:
    """Log line vs client, per the rules in the module docstring."""
    status, outcome = line.get("status"), str(line.get("outcome"))
    bytes_out = int(line.get("bytes_out", 0))
    said = f"log: status {status}, outcome {outcome}, bytes_out {bytes_out}"
    if obs.status is not None:
        if status != obs.status:
            checks.fail("status_match", f"client read {obs.status}; {said}", obs, line)
    elif obs.end in ("no-head", "cut"):
        checks.fail(
            "status_match",
            f"client waited and got no response head (connection: {obs.how}); {said}",
            obs,
            line,
        )
    if obs.end == "clean":
        if obs.in_band_error and _complete(line):
            checks.fail("outcome_match", f"client got a proxy-made error; {said}", obs, line)
        if not obs.in_band_error and not _complete(line):
            checks.fail(
                "outcome_match",
                f"client read a whole {obs.status} response ({obs.body_bytes} bytes); {said}",
                obs,
                line,
            )
        rids = [obs.error_rid] if obs.error_type else obs.error_event_rids
        if obs.in_band_error and any(r != obs.rid for r in rids):
            checks.fail("outcome_match", f"error names request ids {rids}", obs, line)
    elif obs.end == "cut" and _complete(line):
        checks.fail(
            "outcome_match",
            f"client saw the response cut ({obs.how}) after {obs.body_bytes} body bytes; {said}",
            obs,
            line,
        )
    elif obs.end == "no-head" and _complete(line):
        checks.fail("outcome_match", f"client got no response at all; {said}", obs, line)
    elif obs.end == "left" and _complete(line):
        where = "before reading a head" if obs.left == "before-head" else "mid-body"
        name = "outcome_match" if obs.left == "before-head" else "vanished_not_complete"
        checks.fail(
            name,
            f"client left {where} after reading {obs.body_bytes} body bytes"
            f"{f' of {obs.declared}' if obs.declared is not None else ''}; {said}",
            obs,
            line,
        )
    exact = obs.end in ("clean", "close") or (obs.end == "cut" and obs.how in ("eof", "framing"))
    if obs.status is not None and exact and bytes_out != obs.body_bytes:
        checks.fail(
            "bytes_match",
            f"client read {obs.body_bytes} body bytes ({obs.end}, {obs.how or 'framing'}); {said}",
            obs,
            line,
        )
    elif obs.status is not None and not exact and bytes_out < obs.body_bytes:
        checks.fail(
            "bytes_match",
            f"client read {obs.body_bytes} body bytes, more than logged; {said}",
            obs,
            line,
        )
    case = CASE_BY_NAME.get(obs.case)
    if (
        case is not None
        and case.check_bytes_in
        and obs.end == "clean"
        and obs.status == 200
        and obs.upload_done
        and line.get("bytes_in") != case.upload
    ):
        checks.fail(
            "bytes_match",
            f"uploaded {case.upload} bytes; log bytes_in {line.get('bytes_in')}",
            obs,
            line,
        )


def check_ws(
    checks: Checks, obs: Observation, line: dict[str, Any], sessions: list[dict[str, Any]]
) -> None:
    said = f"log: status {line.get('status')}, outcome {line.get('outcome')}"
    if obs.status is not None and line.get("status") != obs.status:
        checks.fail("ws_match", f"client read {obs.status}; {said}", obs, line)
    if obs.status != 101:
        return
    if len(sessions) != 1:
        checks.fail("log_line", f"{len(sessions)} websocket session lines for a 101", obs, line)
        return
    session = sessions[0]
    outcome = session.get("outcome")
    if obs.ws_close is not None and session.get("client_close_code") != obs.ws_close:
        checks.fail(
            "ws_match",
            f"client got close code {obs.ws_close}; session client_close_code "
            f"{session.get('client_close_code')}",
            obs,
            session,
        )
    expected = None
    if obs.end == "left":
        expected = "websocket_client_gone"
    elif obs.end == "closed" and obs.ws_close == 1011:
        expected = "websocket_upstream_lost"
    elif obs.end == "closed" and CASE_BY_NAME[obs.case].ws == "echo":
        expected = "websocket_closed"
        if session.get("upstream_close_code") != 1000:
            checks.fail("ws_match", "client closed with 1000; upstream got another", obs, session)
        if (session.get("bytes_in"), session.get("bytes_out")) != (obs.ws_sent, obs.ws_recv):
            checks.fail(
                "ws_match",
                f"client sent {obs.ws_sent} and got {obs.ws_recv} message bytes; session "
                f"bytes_in {session.get('bytes_in')}, bytes_out {session.get('bytes_out')}",
                obs,
                session,
            )
    if expected is not None and outcome != expected:
        checks.fail(
            "ws_match", f"client {obs.end} (close {obs.ws_close}): outcome {outcome}", obs, session
        )


_CLIENT_OUTCOMES: Final = frozenset({"client_gone", "client_timeout", "websocket_client_gone"})


def check_blame(checks: Checks, obs: Observation, case: Case, outcome: str, line: Any) -> None:
    """Only the upstream misbehaved: no client_* outcome; only the client: no upstream_*."""
    upstream = outcome.startswith("upstream_") or outcome == "websocket_upstream_lost"
    if case.blame == "client" and upstream:
        checks.fail(
            "outcome_blame",
            f"only the client misbehaved ({obs.end}, {obs.how or obs.left or '-'}); "
            f"log outcome {outcome}",
            obs,
            line,
        )
    elif case.blame == "upstream" and outcome in _CLIENT_OUTCOMES:
        checks.fail(
            "outcome_blame", f"only the upstream misbehaved; log outcome {outcome}", obs, line
        )


def check_expected(checks: Checks, obs: Observation, case: Case) -> None:
    if obs.end == "deadline":
        checks.fail("client_deadline", f"no answer and no cut within {DEADLINE_S:g} s", obs, None)
        return
    if obs.how == "framing" or obs.how.startswith("head:"):
        checks.fail(
            "valid_framing",
            f"the client got invalid HTTP from the proxy ({obs.how}) after {obs.body_bytes} "
            "body bytes",
            obs,
            None,
        )
    if obs.status not in case.expect_status or obs.end not in case.expect_end:
        want = f"{sorted(map(str, case.expect_status))} / {sorted(case.expect_end)}"
        checks.fail(
            "expected_response",
            f"expected {want}; got {obs.status} / {obs.end} ({obs.how or '-'})",
            obs,
            None,
        )
    if (
        case.sse_events is not None
        and obs.end == "clean"
        and not obs.in_band_error
        and obs.events != case.sse_events
    ):
        checks.fail(
            "expected_response",
            f"clean stream with {obs.events} events, expected {case.sse_events}",
            obs,
            None,
        )
    if obs.partial_events:
        checks.fail(
            "sse_no_partial_event",
            f"dispatched a partial event: {obs.partial_events[0]!r}",
            obs,
            None,
        )


def check_stall(checks: Checks, obs: Observation, line: dict[str, Any] | None) -> None:
    if obs.resumed_at is None or line is None:
        return
    ended = float(line.get("time", 0.0))
    if ended > obs.resumed_at - STALL_MARGIN_S:
        checks.fail(
            "stalled_reader_released",
            f"client stopped reading at +0 s and read again at "
            f"+{obs.resumed_at - (obs.stalled_at or obs.resumed_at):.1f} s; the exchange ended "
            f"at +{ended - (obs.stalled_at or ended):.1f} s ({line.get('outcome')})",
            obs,
            line,
        )


def _kept_bytes(events: list[dict[str, Any]]) -> int:
    total = 0
    for event in events:
        data = str(event.get("data", ""))
        total += len(data.encode()) + data.count("\n") + 1
        total += len(str(event.get("type", "")).encode()) + len(str(event.get("id", "")).encode())
        if event.get("retry") is not None:
            total += len(str(event["retry"]))
    return total


def check_transcripts(
    checks: Checks,
    run: RunFacts,
    log: LogData,
    transcripts: dict[str, list[dict[str, Any]]],
    bad: list[str],
) -> None:
    for text in bad:
        checks.fail("transcript_match", f"unparseable transcript line: {text!r}")
    for rid, records in transcripts.items():
        for record in records:
            kept = _kept_bytes(record.get("events", []))
            if kept > TRANSCRIPT_MAX:
                checks.fail(
                    "transcript_bound",
                    f"{rid}: {kept} bytes of event fields kept, bound {TRANSCRIPT_MAX}",
                )
    for obs in run.observations:
        case = CASE_BY_NAME.get(obs.case)
        relayed = obs.framing == "chunked" and obs.content_type.startswith("text/event-stream")
        if case is None or case.route not in ("/sse/", "/sse-cut/") or not relayed:
            continue
        lines = log.exchanges.get(obs.rid, [])
        records = transcripts.get(obs.rid, [])
        if len(lines) != 1:
            continue  # log_line reports it
        line = lines[0]
        if len(records) != 1:
            checks.fail("transcript_match", f"{len(records)} transcript lines", obs, line)
            continue
        record = records[0]
        want = TRANSCRIPT_OUTCOMES.get(str(line.get("outcome")), "upstream_failed")
        if record.get("status") != line.get("status") or record.get("outcome") != want:
            checks.fail(
                "transcript_match",
                f"transcript status {record.get('status')} outcome {record.get('outcome')}; "
                f"log status {line.get('status')} outcome {line.get('outcome')} (-> {want})",
                obs,
                line,
            )
        if (
            obs.end == "clean"
            and not obs.in_band_error
            and record.get("events_count") != obs.events
        ):
            checks.fail(
                "transcript_match",
                f"client got {obs.events} events; transcript events_count "
                f"{record.get('events_count')}",
                obs,
                line,
            )


def evaluate(run: RunFacts, log: LogData, transcripts: Path) -> Checks:
    """Every check of :data:`CHECKS` over one run."""
    checks = Checks()
    for excerpt in log.tracebacks:
        checks.fail("no_traceback", excerpt)
    checks.detail["no_traceback"] = (
        f"{len(log.tracebacks)} in {log.lines} log lines; other lines: "
        + (", ".join(f"{k} x{v}" for k, v in sorted(log.other.items())) or "none")
    )
    if not run.alive:
        checks.fail("proxy_alive", f"the proxy died during the soak: {run.proxy_exit}")
    checks.detail["proxy_alive"] = f"exit after SIGTERM: {run.proxy_exit}"
    base, after = run.baseline, run.after
    if after.fds > base.fds + FD_MARGIN or after.fds < 0:
        checks.fail("fds_return", f"baseline {base.fds}, after {after.fds} fds")
    checks.detail["fds_return"] = (
        f"baseline {base.fds}, after {after.fds} (limit {base.fds + FD_MARGIN}), peak "
        f"{run.peak_fds}; idle waits {base.waited_s:.1f} s / {after.waited_s:.1f} s"
    )
    rss_limit = base.rss + max(RSS_MARGIN_BYTES, int(RSS_MARGIN_RATIO * base.rss))
    if after.rss > rss_limit or after.rss < 0:
        checks.fail("rss_return", f"baseline {_mib(base.rss)}, after {_mib(after.rss)}")
    checks.detail["rss_return"] = (
        f"baseline {_mib(base.rss)}, after {_mib(after.rss)} (limit {_mib(rss_limit)}), "
        f"peak {_mib(run.peak_rss)}"
    )
    canary = run.canary
    canary_lines = log.exchanges.get("soak-canary", [])
    if canary is None or canary.status != 200 or canary.end != "clean" or canary.body_bytes != 100:
        checks.fail("canary", "no 200 with 100 bytes", canary, None)
    elif len(canary_lines) != 1 or canary_lines[0].get("outcome") != "complete":
        checks.fail("canary", f"log lines: {canary_lines}", canary, None)
    checks.detail["canary"] = (
        f"{canary.status} {canary.end}, {canary.body_bytes} bytes" if canary else "no answer"
    )
    known = {obs.rid for obs in run.observations} | run.harness_ids
    for rid, lines in log.exchanges.items():
        if rid not in known:
            checks.fail("log_line", f"{len(lines)} line(s) with unknown id {rid!r}", None, lines[0])
    for rid, lines in log.sessions.items():
        if rid not in known:
            checks.fail("log_line", f"session line with unknown id {rid!r}", None, lines[0])
    for text in log.bad_json:
        checks.fail("log_line", f"unparseable access line: {text!r}")
    matched = 0
    for obs in run.observations:
        case = CASE_BY_NAME[obs.case]
        check_expected(checks, obs, case)
        lines = log.exchanges.get(obs.rid, [])
        if not obs.head_sent:
            continue
        if len(lines) != 1:
            checks.fail("log_line", f"{len(lines)} access lines for this request", obs, None)
            continue
        matched += 1
        line = lines[0]
        sessions = log.sessions.get(obs.rid, [])
        if obs.kind == "ws":
            check_ws(checks, obs, line, sessions)
        else:
            check_http(checks, obs, line)
        outcome = str((sessions or [line])[0].get("outcome", ""))
        check_blame(checks, obs, case, outcome, line)
        if case.bounded_stall:
            check_stall(checks, obs, line)
    checks.detail["log_line"] = (
        f"{matched} requests matched to their line; {len(log.exchanges)} ids in the log"
    )
    trans, bad = read_transcripts(transcripts)
    check_transcripts(checks, run, log, trans, bad)
    checks.detail["transcript_match"] = f"{sum(map(len, trans.values()))} transcript lines"
    for error in run.harness_errors:
        checks.fail("harness", error)
    return checks


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
