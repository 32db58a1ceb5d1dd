"""bench/scale.py's report and target 6 in bench/targets.py: pure functions, no processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("psutil", reason="the bench extra is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.scale import ScaleRun, report
from bench.targets import TargetResult, check_targets


def _run(workers: int, rps: float, cpu: float) -> ScaleRun:
    return ScaleRun(workers, rps, 10.0, 20.0, 0, cpu, 10.0, 15.0)


def test_report_takes_medians_and_the_ratio_of_two_workers_to_one() -> None:
    runs = [
        _run(1, 4000, 100),
        _run(2, 7000, 170),
        _run(2, 7600, 180),
        _run(1, 3800, 100),
        _run(1, 4200, 100),
        _run(2, 7400, 175),
    ]
    text, doc = report(runs, 2, 2, 100, 10)
    assert doc["ratio"] == pytest.approx(7400 / 4000)
    assert doc["result"] == "met"
    assert doc["median"]["1"]["rps"] == 4000  # type: ignore[index]
    assert "1.85x" in text and "met" in text


def test_report_is_short_below_the_bound() -> None:
    _, doc = report([_run(1, 4000, 100), _run(2, 6000, 190)], 2, 2, 100, 10)
    assert doc["result"] == "short"
    assert doc["ratio"] == pytest.approx(1.5)


def _six(doc: dict[str, object]) -> TargetResult:
    return next(t for t in check_targets(doc) if t.number == "6")


def test_target_six_reads_the_scale_document() -> None:
    _, scale = report([_run(1, 4000, 100), _run(2, 7600, 190)], 2, 2, 100, 10)
    six = _six({"scale": scale})
    assert six.result == "met"
    assert six.figure.startswith("1.90x")
    missing = _six({})
    assert missing.result.startswith("n/a")
    failed = _six({"scale": {"result": "n/a: wrk missing"}})
    assert failed.result == "n/a: wrk missing"
