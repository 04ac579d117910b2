"""The processes below one process (Linux ``/proc``): the Ray workers a run started.

fedmed ends only the workers of its own Ray instance (never a broad kill), the benchmarks sum
the memory of a run's whole tree, and the tests check that nothing a run started is left.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name; None once the process ended."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parents() -> dict[int, int]:
    """pid -> parent pid for every running process."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            found[int(entry.name)] = int(fields[1])
    return found


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, their children, ...), parents first."""
    tree = parents()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in tree.items() if ppid == parent]
        found += children
        frontier += children
    return found


def command_line(pid: int) -> bytes:
    """The process's command line as the kernel shows it (Ray retitles its workers); b"" once
    the process ended."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells it apart from a later process with the
    same pid); None once it ended (a zombie has ended too)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= 19 or fields[0] == "Z":
        return None
    return fields[19]
