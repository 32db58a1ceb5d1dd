"""The fault soak, short form: 20 s of mixed misbehaving traffic through one proxy
(``python -m bench --soak --seconds 20``, about a minute in all with warm-up and the idle
waits). Runs in the normal ``pytest -q``; the long form is ``python -m bench --soak``.

A failure names the soak's check that failed (see ``bench/soak.py``) and shows its first
examples: what the client saw next to the proxy's access-log line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_fault_soak_20s_logs_what_clients_saw_and_returns_to_baseline(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed")
    report = tmp_path / "soak.json"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--soak",
        "--seconds",
        "20",
        "--out",
        str(report),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr (tail):\n{done.stderr[-4000:]}"

    doc = json.loads(report.read_text(encoding="utf-8"))
    assert doc["ok"] is True
    failed = [name for name, check in doc["checks"].items() if not check["ok"]]
    assert not failed, failed
    # Every case ran (the warm-up runs each once) and real traffic followed.
    from bench.soak_client import CASES

    assert {case.name for case in CASES} <= set(doc["cases"])
    assert doc["exchanges"]["run"] > 100
