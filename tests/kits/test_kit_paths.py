"""Kits travel with their files: every relative path in a site or server kit is read from the
kit's own folder, never the current folder or the checkout."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedmed.kits.files import BUNDLED_PREFIX
from fedmed.kits.server import PATH_KEYS as SERVER_PATH_KEYS
from fedmed.kits.server import ServerKit, load_server_kit
from fedmed.kits.site import PATH_KEYS as SITE_PATH_KEYS
from fedmed.kits.site import SiteKit, load_site_kit
from tests.e2e import REPO

# The text fields that are not paths: a new text field must be listed here or be a path.
SITE_TEXT_NOT_PATHS = {"name", "data.dataset", "coordinator"}
SERVER_TEXT_NOT_PATHS = {"address", "control_address"}
SERVER_PATH_MAPS = {"sites"}  # name -> path: every value is read from the kit's folder


def _text_fields(schema: type, prefix: str = "") -> set[str]:
    """Dotted names of a kit schema's fields holding text (``str``, ``str | None``, a
    mapping to ``str``), nested ones included."""
    names = set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            names |= _text_fields(kind, f"{prefix}{f.name}.")
        elif kind is str or str in typing.get_args(kind):
            names.add(f"{prefix}{f.name}")
    return names


def test_every_text_field_of_a_kit_is_a_path_or_known_not_to_be() -> None:
    assert _text_fields(SiteKit) == set(SITE_PATH_KEYS) | SITE_TEXT_NOT_PATHS
    assert _text_fields(ServerKit) == (
        set(SERVER_PATH_KEYS) | SERVER_TEXT_NOT_PATHS | SERVER_PATH_MAPS
    )


def _raw(kit: Path, key: str) -> str | None:
    value = OmegaConf.select(OmegaConf.load(kit), key)
    return None if value is None else str(value)


def _expected(kit: Path, raw: str) -> str:
    if raw.startswith(BUNDLED_PREFIX) or Path(raw).is_absolute():
        return raw
    return str((kit.parent / raw).resolve())


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example kits copied away from the checkout, read from a third folder."""
    consortium = tmp_path / "consortium"
    for folder in ("sites", "server"):
        shutil.copytree(REPO / folder, consortium / folder)
    cwd = tmp_path / "somewhere-else"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return consortium


def test_example_site_kits_read_their_paths_beside_the_kit(elsewhere: Path) -> None:
    kits = sorted((elsewhere / "sites").glob("*.yaml"))
    assert len(kits) == 4
    relative = 0
    for path in kits:
        kit = load_site_kit(path)
        for key in SITE_PATH_KEYS:
            raw = _raw(path, key)
            got = OmegaConf.select(OmegaConf.structured(kit), key)
            assert got == (None if raw is None else _expected(path, raw)), (path.name, key)
            if raw is not None and not raw.startswith(BUNDLED_PREFIX):
                relative += not Path(raw).is_absolute()
                assert Path(got).is_relative_to(elsewhere), (path.name, key, got)
    assert relative >= 4 * 5  # ledger, signing key, CA, node key and public key per site


def test_example_server_kit_reads_its_paths_beside_the_kit(elsewhere: Path) -> None:
    path = elsewhere / "server" / "coordinator.yaml"
    kit = load_server_kit(path)
    for key in SERVER_PATH_KEYS:
        raw = _raw(path, key)
        assert raw is not None and not Path(raw).is_absolute()
        assert getattr(kit, key) == _expected(path, raw)
        assert Path(getattr(kit, key)).is_relative_to(elsewhere)
    raw_sites = OmegaConf.load(path)["sites"]
    assert kit.sites == {name: _expected(path, str(key)) for name, key in raw_sites.items()}
    assert all(Path(key).is_relative_to(elsewhere) for key in kit.sites.values())


def test_absolute_and_home_paths_are_kept(tmp_path: Path) -> None:
    kit = tmp_path / "kit.yaml"
    kit.write_text(
        "name: north\ndata:\n  path: /data/north.csv\nprivacy:\n  ledger: ~/north.jsonl\n"
    )
    loaded = load_site_kit(kit)
    assert loaded.data.path == "/data/north.csv"
    assert loaded.privacy.ledger == str(Path("~/north.jsonl").expanduser())
