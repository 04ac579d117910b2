"""Site kits: typed YAML per hospital; the heart federation read through its four kits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmed.data import load_site, site_names
from fedmed.errors import FedMedError
from fedmed.kits.site import load_site_kit
from fedmed.runs.compose import compose_config
from tests.e2e import REPO


def test_heart_kits_give_the_same_sites_as_the_bundled_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    via_paths = compose_config(["dataset=heart"])
    via_kits = compose_config(["dataset=heart_kits"])
    assert site_names(via_kits) == ["cleveland", "hungary", "switzerland", "va"]
    for i in range(4):
        a, b = load_site(via_paths, i), load_site(via_kits, i)
        assert a.name == b.name
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)


def test_relative_data_path_is_read_from_the_kit_folder(tmp_path: Path) -> None:
    (tmp_path / "kit.yaml").write_text("name: north\ndata:\n  path: data/north.csv\n")
    kit = load_site_kit(tmp_path / "kit.yaml")
    assert kit.name == "north"
    assert kit.data.path == str(tmp_path / "data" / "north.csv")


def test_unknown_kit_key_names_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudget_epsilonn: 3\n")
    with pytest.raises(FedMedError, match=r"bad\.yaml: key 'budget_epsilonn'"):
        load_site_kit(bad)


def test_missing_kit_is_named(tmp_path: Path) -> None:
    with pytest.raises(FedMedError, match=r"nope\.yaml: file not found"):
        load_site_kit(tmp_path / "nope.yaml")
