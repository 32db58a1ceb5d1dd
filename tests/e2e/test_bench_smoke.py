"""The benchmark harness runs end to end at its tiniest sizes (no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("small", "ttfb", "sse", "streams", "bulk", "slow_reader")
SCENARIOS = ("direct", "proxycore")


def test_bench_tiny_run_writes_every_workload(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed")
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--tiny",
        "--scenarios",
        ",".join(SCENARIOS),
        "--out",
        str(tmp_path),
        "--no-chart",
        "--strict",
    ]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=55, check=False
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1, written
    assert written[0].with_suffix(".md").exists()
    doc = json.loads(written[0].read_text(encoding="utf-8"))
    assert set(SCENARIOS) <= set(doc["scenarios"])
    assert set(WORKLOADS) <= set(doc["workloads"])
    for workload in WORKLOADS:
        cases = doc["workloads"][workload]
        assert cases, workload
        for case in cases.values():
            assert set(SCENARIOS) <= set(case["scenarios"]), (workload, case["title"])
