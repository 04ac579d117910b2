"""Where the Hydra tree is found: the installed package ``fedmed.conf`` (the checkout's
``conf/``, not a copy), a user's own tree (``$FEDMED_CONFIG_DIR``), and Hydra's
``--config-dir`` adding options to it."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest

from fedmed.cli import main
from fedmed.config.compose import (
    CONFIG_DIR_ENV,
    CONFIG_PACKAGE,
    config_dir,
    config_dir_as_searchpath,
)
from fedmed.errors import FedMedError
from fedmed.runs.compose import compose_config
from tests.e2e import REPO, run_fedmed

# A federation option of the user's own, beside the installed ones.
SHORT_FEDERATION = "defaults:\n  - federation_schema\n  - _self_\n\nrounds: 1\nmin_sites: 3\n"


def test_the_installed_tree_is_the_checkouts_conf() -> None:
    assert config_dir() == Path(str(resources.files(CONFIG_PACKAGE)))
    assert config_dir() == REPO / "conf"  # the editable install maps the one tree


def test_fedmed_config_dir_replaces_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "our-conf"
    shutil.copytree(REPO / "conf", tree, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    main_config = tree / "config.yaml"
    assert "\nseed: 0\n" in main_config.read_text()
    main_config.write_text(main_config.read_text().replace("\nseed: 0\n", "\nseed: 7\n"))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tree))
    assert config_dir() == tree
    assert compose_config([]).seed == 7


def test_a_config_dir_without_config_yaml_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(FedMedError, match=f"no config.yaml in {tmp_path} .*{CONFIG_DIR_ENV}"):
        config_dir()


@pytest.fixture
def extra_tree(tmp_path: Path) -> Path:
    (tmp_path / "federation").mkdir()
    (tmp_path / "federation" / "short.yaml").write_text(SHORT_FEDERATION)
    return tmp_path


@pytest.mark.parametrize("form", ["--config-dir DIR", "--config-dir=DIR", "-cd DIR"])
def test_config_dir_adds_the_users_options(extra_tree: Path, form: str) -> None:
    flag = form.replace("DIR", str(extra_tree)).split(" ")
    args = config_dir_as_searchpath(["federation=short", *flag, "--multirun"])
    assert args == ["federation=short", f"hydra.searchpath=['file://{extra_tree}']", "--multirun"]
    federation = compose_config([a for a in args if not a.startswith("-")]).federation
    assert (federation.rounds, federation.min_sites) == (1, 3)


def test_config_dir_reaches_hydras_runner(extra_tree: Path) -> None:
    """The composed job as Hydra's own runner prints it (``--cfg job``)."""
    done = run_fedmed(
        "simulate", "--config-dir", str(extra_tree), "federation=short", "--cfg", "job"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rounds: 1\n" in done.stdout and "min_sites: 3\n" in done.stdout


def test_config_dir_mistakes_are_one_line(
    tmp_path: Path, extra_tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert config_dir_as_searchpath(["seed=1", "-m"]) == ["seed=1", "-m"]
    missing = tmp_path / "nowhere"
    assert main(["simulate", "--config-dir", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"fedmed: config error: --config-dir '{missing}': no such folder\n"
    )
    with pytest.raises(FedMedError, match="not both"):
        config_dir_as_searchpath(["-cd", str(extra_tree), "hydra.searchpath=[pkg://x]"])
    with pytest.raises(FedMedError, match="no such folder"):
        config_dir_as_searchpath(["--config-dir"])
