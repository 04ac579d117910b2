"""Helpers shared by the benchmark scripts: run the real CLI, summarise over seeds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_cli(command: str, args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``fedmed COMMAND ARGS`` in a subprocess; returns it and its wall time. Fails loudly."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedmed.cli", command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{command} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc, wall


def run(command: str, overrides: list[str], workdir: Path) -> tuple[dict[str, Any], float]:
    """Run one fedmed command; returns its summary and the wall time of the whole process."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    _, wall = run_cli(command, [*overrides, f"hydra.run.dir={out}"])
    return json.loads((out / "summary.json").read_text()), wall


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }
