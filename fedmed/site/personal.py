"""A site's personal model (``personalization=finetune|mrmtl``): kept beside its ledger.

Nothing here is sent anywhere. The folder ``<ledger dir>/<site>.personal/`` holds the
personal model of the site's latest run (``model.pt``, a state_dict ``build_model`` loads),
the run it belongs to (``run_id``), and the site's own report comparing the global and the
personal model exactly on its own test patients (``personal_report.md`` and ``.json``).
A new run starts from the global model again: a personal model never crosses runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmed.errors import ConfigError, SiteError
from fedmed.kits.site import SiteKit
from fedmed.metrics import EvalStats

PERSONAL_SUFFIX = ".personal"
MODEL_FILE = "model.pt"
RUN_FILE = "run_id"
REPORT_FILE = "personal_report.md"
REPORT_JSON = "personal_report.json"
FIGURES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")


def personal_folder(kit: SiteKit) -> Path:
    """``<ledger dir>/<site>.personal``: the site's own folder, where its ledger is."""
    if kit.privacy.ledger is None:
        raise SiteError(
            kit.name,
            "personalization needs privacy.ledger in the site's kit: the personal model is "
            "kept beside the ledger",
        )
    return Path(kit.privacy.ledger).parent / f"{kit.name}{PERSONAL_SUFFIX}"


def local_keys(model: nn.Module, prefixes: list[str] | None) -> set[str]:
    """The state_dict keys FedPer keeps at the site: those of the layers ``prefixes`` name,
    or (None) those of the model's last layer with weights, its head."""
    keys = list(model.state_dict())
    if prefixes is None:
        layers = [name for name, m in model.named_modules() if list(m.parameters(False))]
        prefixes = [layers[-1]]
    chosen = {k for k in keys for p in prefixes if k == p or k.startswith(p.rstrip(".") + ".")}
    if not chosen or len(chosen) == len(keys):
        raise ConfigError(
            "personalization.local_layers",
            prefixes,
            f"layers covering some, not all, of the model's weights: {', '.join(keys)}",
        )
    return chosen


def _replace(path: Path, write: Any) -> None:
    """Write through a temporary file and rename: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class PersonalStore:
    """The personal model of one site for one run."""

    folder: Path
    run_id: str

    def load_into(self, model: nn.Module) -> bool:
        """Load this run's personal model into ``model``; False when it has none yet."""
        run_file, model_file = self.folder / RUN_FILE, self.folder / MODEL_FILE
        if not run_file.is_file() or run_file.read_text().strip() != self.run_id:
            return False
        model.load_state_dict(torch.load(model_file, weights_only=True))
        return True

    def save(self, model: nn.Module) -> None:
        """The model file first, then the run it belongs to (so a crash between the two
        leaves an older run's id: the next round starts from the global model again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / RUN_FILE).unlink(missing_ok=True)
        _replace(self.folder / MODEL_FILE, lambda p: torch.save(model.state_dict(), p))
        _replace(self.folder / RUN_FILE, lambda p: p.write_text(self.run_id + "\n"))

    def write_report(
        self, site: str, method: str, server_round: int, models: dict[str, EvalStats],
        notes: list[str],
    ) -> Path:  # fmt: skip
        """The site's own comparison, exact, on its own test split."""
        self.folder.mkdir(parents=True, exist_ok=True)
        figures = {name: _figures(stats) for name, stats in models.items()}
        data = {"site": site, "run_id": self.run_id, "personalization": method,
                "round": server_round, "test_records": _records(models), "models": figures,
                "notes": notes}  # fmt: skip
        _replace(self.folder / REPORT_JSON, lambda p: p.write_text(json.dumps(data, indent=2)))
        _replace(self.folder / REPORT_FILE, lambda p: p.write_text(_markdown(data)))
        return self.folder / REPORT_FILE


def _records(models: dict[str, EvalStats]) -> int:
    return next(iter(models.values())).num_examples if models else 0


def _figures(stats: EvalStats) -> dict[str, float | None]:
    values = {name: getattr(stats, name) for name in FIGURES}
    return {name: None if v is None else float(v) for name, v in values.items()}


def _markdown(data: dict[str, Any]) -> str:
    rows = [
        f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in f.values()) + " |"
        for name, f in data["models"].items()
    ]
    return "\n".join([
        f"# {data['site']}: global and personal model on this site's own patients",
        "",
        f"Run `{data['run_id']}`, after round {data['round']}, personalization="
        f"`{data['personalization']}`. Computed here, exactly, on this site's "
        f"{data['test_records']} test records (decision threshold: margin 0). Nothing in "
        "this folder was sent to the coordinator or to another site.",
        "",
        "| model | " + " | ".join(f.replace("_", " ") for f in FIGURES) + " |",
        "|---|" + "---|" * len(FIGURES),
        *rows,
        "",
        *[f"- {note}" for note in data["notes"]],
        "",
    ])  # fmt: skip
