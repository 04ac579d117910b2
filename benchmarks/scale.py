"""Scale (issue 7): wall time and peak memory of one `fedmed simulate` at 10, 100, 1,000 sites.

SYNTHETIC heart-disease sites (`dataset=synthetic_heart`, ~100 records each), 10% of the sites
sampled per round (at least 3, the SecAgg+ minimum), svm, DP on, SecAgg+ over the sampled
sites with num_shares = 2*ceil(log2(sampled)) + 1 (all sampled sites for small rounds),
3 rounds. Peak memory is the largest sum of RSS over the whole process tree (driver, Ray's
processes, its workers), sampled every 0.2 s from /proc.

Usage: .venv/bin/python benchmarks/scale.py [--sites 10 100 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, RESULTS

PAGE = os.sysconf("SC_PAGE_SIZE")


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def tree_rss(root: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    parents = _parents()
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def measured_run(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run ``fedmed ARGS``; returns the process, its wall time and peak tree memory."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "fedmed.cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak = 0
        while popen.poll() is None:
            peak = max(peak, tree_rss(popen.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - started
        out.seek(0)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, out.read(), "")
    if proc.returncode != 0:
        raise SystemExit(f"fedmed {args} failed:\n{proc.stdout[-3000:]}")
    return proc, wall, peak


def scale_overrides(sites: int, rounds: int) -> list[str]:
    sampled = max(3, math.ceil(0.1 * sites))
    shares = min(sampled, 2 * math.ceil(math.log2(sampled)) + 1)
    return [
        "dataset=synthetic_heart",
        f"federation.num_sites={sites}",
        "federation.fraction=0.1",
        "federation.min_sites=3",
        "model=svm",
        "privacy=dp",
        "secagg=secaggplus",
        f"secagg.num_shares={shares}",
        f"federation.rounds={rounds}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            out = Path(tmp) / f"sites{sites}"
            overrides = scale_overrides(sites, args.rounds)
            proc, wall, peak = measured_run(["simulate", *overrides, f"hydra.run.dir={out}"])
            summary = json.loads((out / "summary.json").read_text())
            round_lines = [line for line in proc.stdout.splitlines() if line.startswith("round")]
            row = {
                "sites": sites,
                "overrides": overrides,
                "wall_seconds": wall,
                "peak_rss_gib": peak / 2**30,
                "status": summary["status"],
                "rounds_completed": summary["rounds_completed"],
                "accuracy": summary["global"]["accuracy"],
                "round_lines": round_lines,
            }
            rows.append(row)
            print(
                f"{sites:>5} sites: {wall:7.1f} s, peak {row['peak_rss_gib']:.2f} GiB, "
                f"{summary['status']}, accuracy {row['accuracy']:.3f}",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
