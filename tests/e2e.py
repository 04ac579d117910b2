"""Helpers for end-to-end tests that run the real ``fedmed`` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_fedmed(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fedmed.cli ARGS`` and return the finished process (output captured)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedmed.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def derive_cohort(out: Path, *args: str) -> str:
    """Write an imbalanced cohort with benchmarks/imbalanced_cohort.py; returns its output."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "imbalanced_cohort.py"), "--out", str(out),
         *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary
