"""``--fail-if`` thresholds (k6 style): parsed once, checked against a result's figures.

Grammar (whitespace allowed between the parts)::

    threshold := figure op number [unit]
    op        := ">" | ">=" | "<" | "<="
    figure    := timing "_" stat            unit: ms (default), s or us
               | "errors"                   unit: % (the error rate) or none (a count)
               | "error_rate"               unit: % or none (a fraction, 0.001 = 0.1%)
               | "rps" | "tokens_per_s" | "throughput" | "ok" | "dropped"
               | "output_tokens" | "reinitializations"      no unit
               | "stream_tps_" ("p50" | "p90" | "p99" | "min" | "mean")  no unit
               | "cpu_share"                unit: % or none (a fraction of one core)
    timing    := ttfb | latency | ttft | itl | first_event | event_delay | connect | queue
    stat      := p50 | p90 | p99 | p99.9 | max | mean

A threshold *fails* when its comparison holds: ``ttft_p99>800ms`` fails a run whose
TTFT p99 is over 800 ms; ``rps<100`` one that made fewer than 100 requests/s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..loadgen.figures import STATS, TIMINGS, figures
from ..loadgen.spec import LoadResult

__all__ = ["Threshold", "ThresholdError", "check_thresholds", "parse_threshold"]

_FORM: Final = re.compile(
    r"\s*([a-z_][a-z0-9_.]*)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*",
    re.IGNORECASE,
)
_TIME_UNITS: Final = {"ms": 1e-3, "s": 1.0, "us": 1e-6, "": 1e-3}
_PLAIN: Final = frozenset(
    {"rps", "tokens_per_s", "throughput", "ok", "dropped", "output_tokens", "reinitializations"}
)
_FRACTIONS: Final = frozenset({"error_rate", "cpu_share"})
_TPS_STATS: Final = ("p50", "p90", "p99", "min", "mean")


class ThresholdError(ValueError):
    """A threshold that does not follow the grammar (the message says what is wrong)."""


@dataclass(frozen=True)
class Threshold:
    """One ``--fail-if``: ``figure op limit`` (limit in the figure's own units)."""

    text: str
    figure: str
    op: str
    limit: float

    def fails(self, figures: dict[str, float]) -> bool:
        value = figures[self.figure]
        if self.op == ">":
            return value > self.limit
        if self.op == ">=":
            return value >= self.limit
        if self.op == "<":
            return value < self.limit
        return value <= self.limit

    def describe(self, figures: dict[str, float]) -> str:
        """``text (measured: value)`` in the threshold's terms."""
        value = figures[self.figure]
        if self.figure in _FRACTIONS:
            shown = f"{value * 100:.4g}%"
        elif "_" in self.figure and self.figure.rsplit("_", 1)[0] in TIMINGS:
            shown = f"{value * 1000:.4g}ms"
        else:
            shown = f"{value:.6g}"
        return f"{self.text} (measured {shown})"


def parse_threshold(text: str) -> Threshold:
    """Parse one threshold. Raises :class:`ThresholdError`."""
    m = _FORM.fullmatch(text)
    if m is None:
        raise ThresholdError(
            f"{text!r} is not FIGURE OP NUMBER[UNIT] (for example 'ttft_p99>800ms' or "
            "'errors>0.1%')"
        )
    name, op, number, unit = m[1].lower(), m[2], float(m[3]), m[4].lower()
    if not math.isfinite(number):
        raise ThresholdError(f"{text!r}: the number is not finite")
    clean = f"{name}{op}{m[3]}{unit}"
    if name == "errors":
        if unit == "%":
            return Threshold(clean, "error_rate", op, number / 100.0)
        if unit:
            raise ThresholdError(f"{text!r}: errors takes % (a rate) or no unit (a count)")
        return Threshold(clean, "errors", op, number)
    if name in _FRACTIONS:
        if unit not in ("", "%"):
            raise ThresholdError(f"{text!r}: {name} takes % or no unit (a fraction)")
        return Threshold(clean, name, op, number / 100.0 if unit == "%" else number)
    if name in _PLAIN or name.startswith("stream_tps_"):
        if name.startswith("stream_tps_") and name[len("stream_tps_") :] not in _TPS_STATS:
            raise ThresholdError(
                f"{text!r}: stream_tps takes one of {', '.join(_TPS_STATS)} (stream_tps_p50)"
            )
        if unit:
            raise ThresholdError(f"{text!r}: {name} takes no unit")
        return Threshold(clean, name, op, number)
    timing, _, stat = name.rpartition("_")
    if timing in TIMINGS and stat in STATS:
        if unit not in _TIME_UNITS:
            raise ThresholdError(f"{text!r}: a time takes ms (the default), s or us")
        return Threshold(clean, name, op, number * _TIME_UNITS[unit])
    raise ThresholdError(
        f"{text!r}: unknown figure {name!r}; use TIMING_STAT (timings: {', '.join(TIMINGS)}; "
        f"stats: {', '.join(STATS)}), errors, error_rate, rps, tokens_per_s, stream_tps_p50, "
        "throughput, ok, dropped, output_tokens, reinitializations or cpu_share"
    )


def check_thresholds(
    thresholds: Sequence[Threshold], results: Sequence[LoadResult]
) -> tuple[list[str], list[dict[str, object]]]:
    """Check every threshold on every result: the failures (text naming the threshold,
    the measured value and, with several targets, the target) and every check (JSON)."""
    failures: list[str] = []
    checks: list[dict[str, object]] = []
    for result in results:
        values = figures(result)
        for threshold in thresholds:
            failed = threshold.fails(values)
            text = threshold.describe(values)
            if len(results) > 1:
                text = f"{text} on {result.spec.url}"
            if failed:
                failures.append(text)
            checks.append(
                {
                    "threshold": threshold.text,
                    "target": result.spec.url,
                    "failed": failed,
                    "value": values[threshold.figure],
                }
            )
    return failures, checks
