"""What each site sent, value by value, checked against the protocol's inventory.

For every reply it receives the coordinator writes one line to ``releases.jsonl`` in the run
folder: round, site, stage, and for every value in the reply its record, key and what
``fedmed.protocol.RELEASES`` declares it (never the value itself), with the ledger entry the
reply names. A reply holding a value the inventory does not declare, under DP an exact
statistic, or a model update or private statistic without its ledger entry, is recorded as
the site's failure: an auditor can check a real deployment's traffic, not only the code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedmed.protocol import LEDGERED, Release, declared

RELEASES_FILE = "releases.jsonl"
LEDGER_ENTRY_KEY = "ledger_entry"
UNDECLARED = "UNDECLARED"


def reply_values(content: RecordDict) -> list[tuple[str, str]]:
    """(record, key) of every value a reply holds; a record of arrays counts as one value,
    ``*`` (an empty one, a declined or masked update, holds none)."""
    values = [(name, key) for name, record in content.config_records.items() for key in record]
    values += [(name, key) for name, record in content.metric_records.items() for key in record]
    values += [(name, "*") for name, record in content.array_records.items() if len(record)]
    return values


def ledger_entry(content: RecordDict) -> str | None:
    """The ledger entry a reply names (its fit or evaluate report's ``ledger_entry``)."""
    for record in content.config_records.values():
        value = record.get(LEDGER_ENTRY_KEY)
        if isinstance(value, str):
            return value
    return None


def problems(kinds: dict[str, Release | None], entry: str | None, private: bool) -> list[str]:
    """What is wrong with a reply's values: undeclared ones; under DP (``private``) exact
    statistics, and ledgered kinds without the ledger entry."""
    found = [f"undeclared value {name}" for name, kind in kinds.items() if kind is None]
    if private:
        found += [f"exact statistic {n} under DP" for n, k in kinds.items() if k is Release.EXACT]
        if entry is None:
            found += [f"{n} without its ledger entry" for n, k in kinds.items() if k in LEDGERED]
    return found


@dataclass
class ReleaseLog:
    """The run's ``releases.jsonl``, appended reply by reply."""

    output_dir: Path
    private: bool  # privacy=dp: every value must be public, protocol or ledgered
    lines: int = field(default=0, init=False)

    @property
    def path(self) -> Path:
        return self.output_dir / RELEASES_FILE

    def record(self, server_round: int, site: str, stage: str, content: RecordDict) -> list[str]:
        """Log one reply; returns its problems (empty for a reply within the inventory)."""
        kinds = {f"{record}/{key}": declared(record, key) for record, key in reply_values(content)}
        entry = ledger_entry(content)
        found = problems(kinds, entry, self.private)
        line: dict[str, Any] = {
            "round": server_round,
            "site": site,
            "stage": stage,
            "values": {name: kind.name if kind else UNDECLARED for name, kind in kinds.items()},
            LEDGER_ENTRY_KEY: entry,
        }
        if found:
            line["problems"] = found
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
        self.lines += 1
        return found


def read_releases(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of a run's ``releases.jsonl``."""
    path = run_dir / RELEASES_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
