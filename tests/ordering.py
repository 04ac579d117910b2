"""The order in which `make test` hands test files to its workers: costliest first.

`make test` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder`` on 2 cores: each file
runs whole on one worker (its module fixtures are shared) and files are handed out in
collection order. The suite is CPU-bound (every run starts Ray and Python processes; a
deployed site starts one Python process per Flower message): one worker per core (a third
one starved single runs past their timeouts in CI). Started first, the longest files overlap
each other instead of running last on one worker while the others idle. Each costly file
says what it costs on itself::

    pytestmark = [pytest.mark.slow, pytest.mark.cost(300)]

in seconds: the file alone (``pytest FILE --durations=0`` on 2 cores); only the order they
give matters. The order travels with the file through any rename; a slow file that does not
say is an error, never a file silently moved to the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def file_costs(items: list[pytest.Item]) -> dict[Path, float]:
    """Each file's declared ``cost`` (seconds); a usage error names every slow file that
    declares none, and every file that declares a bad one."""
    costs: dict[Path, float] = {}
    problems: dict[str, str] = {}
    for item in items:
        marker = item.get_closest_marker("cost")
        where = item.nodeid.split("::")[0]
        if marker is None:
            if item.get_closest_marker("slow") is not None:
                problems[where] = "is marked slow but declares no pytest.mark.cost(seconds)"
            continue
        seconds = marker.args[0] if len(marker.args) == 1 and not marker.kwargs else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            given = [repr(a) for a in marker.args] + [
                f"{k}={v!r}" for k, v in marker.kwargs.items()
            ]
            problems[where] = (
                f"has pytest.mark.cost({', '.join(given)}); expected one number of seconds > 0"
            )
            continue
        costs[item.path] = max(costs.get(item.path, 0.0), float(seconds))
    if problems:
        lines = [f"  {where} {problem}" for where, problem in sorted(problems.items())]
        raise pytest.UsageError(
            "test files must declare their cost for `make test` to start them in time:\n"
            + "\n".join(lines)
        )
    return costs


def order_by_cost(items: list[pytest.Item]) -> None:
    """Sort ``items`` in place: files by declared cost, largest first; files without one
    after them; the order inside a file (and among equal costs) unchanged."""
    costs = file_costs(items)
    items.sort(key=lambda item: -costs.get(item.path, 0.0))
