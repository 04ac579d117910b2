"""The Flower App project ``fedmed server run`` writes from the installed fedmed: Flower
accepts it, it bundles no code (each machine runs its installed fedmed), and the checkout's
copy of its table (for ``flwr run .``) is the same."""

from __future__ import annotations

import importlib.metadata
import io
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate
from flwr.common.config import parse_config_args

from fedmed.errors import FedMedError
from fedmed.runs.flower_project import (
    OUTPUT_DIR_KEY,
    OVERRIDES_KEY,
    REGISTRY_KEY,
    app_table,
    write_app_project,
    write_run_config,
)
from tests.e2e import REPO


def test_the_checkouts_flower_app_table_is_the_one_fedmed_writes() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"] == app_table()


def test_the_written_project_is_a_flower_app_bundling_no_code(tmp_path: Path) -> None:
    folder = write_app_project(tmp_path / "flower-app")
    assert write_app_project(folder) == folder  # a later run rewrites it in place
    config, warnings = load_and_validate(folder / "pyproject.toml")  # Flower's own check
    assert warnings == []
    assert config["project"]["version"] == importlib.metadata.version("fedmed")
    assert config["tool"]["flwr"]["app"] == app_table()
    (folder / "fedmed" / "runs").mkdir(parents=True)  # code beside it is never bundled
    (folder / "fedmed" / "runs" / "flower_app.py").write_text("raise SystemExit\n")
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder)))
    assert sorted(fab.namelist()) == [".info/CONTENT", "pyproject.toml"]
    bundled = tomllib.loads(fab.read("pyproject.toml").decode())
    assert bundled["tool"]["flwr"]["app"]["components"] == app_table()["components"]


def test_run_config_file_passes_any_text_to_the_apps(tmp_path: Path) -> None:
    values = {
        OVERRIDES_KEY: "dataset=heart 'hydra.run.dir=a b' seed=\"1\"",
        OUTPUT_DIR_KEY: str(tmp_path / 'it\'s a "run"'),
        REGISTRY_KEY: str(tmp_path / "registry.json"),
    }
    path = write_run_config(tmp_path / "configs" / "run-1.toml", values)
    assert parse_config_args([str(path)]) == values  # as `flwr run --run-config FILE` reads it
    with pytest.raises(FedMedError, match="unknown keys \\['overides'\\]"):
        write_run_config(tmp_path / "bad.toml", {"overides": ""})
