"""Helpers for end-to-end tests that run the real ``fedmed`` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The commands that start Flower's Ray engine.
_RAY_COMMANDS = (("simulate",), ("audit", "empirical"))
# `make test` runs two files at a time on 2 cores, CPU-bound: each Ray site worker a run
# starts imports torch, Opacus and Flower (10-20 CPU-s). One worker for all sites (the real
# engine, sites served in turn) cut a 3-round heart DP run from 73 to 57 CPU-s at the same
# wall time alone. A test about the workers themselves sets engine.num_cpus_per_site.
ONE_SITE_WORKER = f"engine.num_cpus_per_site={min(2, os.cpu_count() or 1)}"


def _with_one_site_worker(args: tuple[str, ...]) -> tuple[str, ...]:
    for command in _RAY_COMMANDS:
        if args[: len(command)] == command:
            if any(a.startswith("engine.num_cpus_per_site=") for a in args):
                return args
            # right after the command: Hydra's parser takes its overrides in one piece
            return (*command, ONE_SITE_WORKER, *args[len(command) :])
    return args


def run_fedmed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fedmed.cli ARGS`` and return the finished process (output captured);
    a run on Flower's Ray engine gets one site worker unless the test chooses."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedmed.cli", *_with_one_site_worker(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary
