"""Helpers shared by the benchmark scripts: run the real CLI, measure its memory, summarise."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedmed.process_tree import descendants

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
T = TypeVar("T")


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
    """Run one fedmed command; returns its summary and the wall time of the whole process.

    A run whose evaluation was private (DP) also gets ``exact``: the researcher's exact
    evaluation of its global model (``model_utility``), to measure the model itself.
    """
    out = Path(tempfile.mkdtemp(dir=workdir))
    _, wall = run_cli(command, [*overrides, f"hydra.run.dir={out}"])
    return with_exact_evaluation(out), wall


def with_exact_evaluation(run_dir: Path) -> dict[str, Any]:
    """A run's summary, with ``exact`` figures of its global model when it evaluated privately."""
    from fedmed.runs.exact_evaluation import exact_evaluation

    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    if summary["global"].get("evaluation") == "private":
        exact = exact_evaluation(run_dir)
        summary["exact"] = {
            "accuracy": exact.accuracy,
            "balanced_accuracy": exact.balanced_accuracy,
            "sensitivity": exact.sensitivity,
            "specificity": exact.specificity,
            "auc": exact.auc,
            "loss": exact.loss,
            "threshold": exact.threshold,
        }
    return summary


def model_utility(summary: dict[str, Any]) -> dict[str, Any]:
    """The global model's figures: exact (a DP run's private ones are noisy estimates)."""
    exact: dict[str, Any] | None = summary.get("exact")
    return exact if exact is not None else summary["global"]


PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


@dataclass
class MeasuredRun:
    """One ``fedmed`` process: its output, wall time and the memory of its process tree."""

    proc: subprocess.CompletedProcess[str]
    wall: float
    rss_samples: list[tuple[float, int]]  # (seconds since start, bytes), every 0.2 s

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.rss_samples), default=0)


def measured_run(args: list[str]) -> MeasuredRun:
    """Run ``fedmed ARGS``, sampling the memory of its whole process tree. Fails loudly."""
    started = time.perf_counter()
    samples: list[tuple[float, int]] = []
    with tempfile.TemporaryFile("w+") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "fedmed.cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        while popen.poll() is None:
            samples.append((time.perf_counter() - started, tree_rss(popen.pid)))
            time.sleep(0.2)
        wall = time.perf_counter() - started
        out.seek(0)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, out.read(), "")
    if proc.returncode != 0:
        raise SystemExit(f"fedmed {args} failed:\n{proc.stdout[-3000:]}")
    return MeasuredRun(proc, wall, samples)


def write_results(filename: str, data: Any, quick: bool) -> None:
    """Save raw numbers under benchmarks/results; a ``--quick`` run only proves the script works."""
    if quick:
        print(f"(quick run: {filename} not written)")
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / filename).write_text(json.dumps(data, indent=2) + "\n")


def quick_subset(items: Sequence[T], quick: bool) -> list[T]:
    """All ``items``, or in a ``--quick`` run only the first: each code path runs once."""
    return list(items[:1] if quick else items)


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }
