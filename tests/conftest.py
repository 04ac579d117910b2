"""Shared fixtures: config composition and copies of the bundled heart-disease files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmed.config.schema import FedMedConfig
from fedmed.data import resolve_path
from fedmed.runs.compose import compose_config
from tests.figures import Saved, spy_on_saved_figures
from tests.ordering import order_by_cost

REPO_ROOT = Path(__file__).resolve().parents[1]
HEART_FILES = {
    "cleveland": "bundled:heart_disease/processed.cleveland.data",
    "hungary": "bundled:heart_disease/processed.hungarian.data",
    "switzerland": "bundled:heart_disease/processed.switzerland.data",
    "va": "bundled:heart_disease/processed.va.data",
}


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Saved]:
    """Every figure saved during the test, as it was drawn (``tests.figures.Saved``)."""
    return spy_on_saved_figures(monkeypatch)


@pytest.fixture
def compose() -> Callable[..., FedMedConfig]:
    """``compose("dataset=pneumonia", "model=cnn")`` -> typed, validated FedMedConfig."""

    def _compose(*overrides: str, config_name: str = "config") -> FedMedConfig:
        return compose_config(list(overrides), config_name)

    return _compose


@pytest.fixture
def heart_copies(tmp_path: Path) -> Callable[[str], list[Path]]:
    """Copy the four bundled heart files into ``tmp_path/<folder>``; returns their paths in
    site order (cleveland, hungary, switzerland, va). Each folder is a fresh set of paths, so
    fedmed's per-path caches never serve one folder's content for another."""

    def _copy(folder: str) -> list[Path]:
        dest = tmp_path / folder
        dest.mkdir()
        out = []
        for source in HEART_FILES.values():
            src = resolve_path(source)
            out.append(Path(shutil.copy(src, dest / src.name)))
        return out

    return _copy


@pytest.fixture
def kit_copy(tmp_path: Path) -> Callable[..., Path]:
    """``kit_copy("va", max_run_epsilon=0.5)``: a copy of the example kit sites/va.yaml in
    ``tmp_path/kits`` with its ledger and signing key in ``tmp_path/ledgers`` and the given
    ``privacy`` values changed (top-level keys with ``top={...}``); returns its path."""

    def _copy(site: str, top: dict[str, Any] | None = None, **privacy: Any) -> Path:
        kit = yaml.safe_load((REPO_ROOT / "sites" / f"{site}.yaml").read_text())
        kit["privacy"].update(
            ledger=str(tmp_path / "ledgers" / f"{site}.ledger.jsonl"), signing_key=None
        )
        kit["privacy"].update(privacy)
        kit.update(top or {})
        folder = tmp_path / "kits"
        folder.mkdir(exist_ok=True)
        path = folder / f"{site}.yaml"
        path.write_text(yaml.safe_dump(kit))
        return path

    return _copy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order_by_cost(items)  # costliest files first, each by its own pytest.mark.cost
