"""fedmed as a hospital's IT installs it: the wheel (built from the sdist) in a fresh venv,
run from a folder that is not the checkout.

The venv reuses the suite's installed dependencies (torch, Flower, Ray, ...) through a
``.pth`` line after its own site-packages, so nothing is downloaded. The suite's editable
fedmed stays invisible there: its import hook is installed by a ``.pth`` file, and Python runs
``.pth`` files only in site folders, not in folders a ``.pth`` line adds. The tests assert
that the fedmed imported is the wheel's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import REPO, read_summary

pytestmark = [pytest.mark.slow, pytest.mark.cost(90)]  # seconds, the file alone on 2 cores

VERSION_LINE = "fedmed 0.1.0 (installed package)"
# What the installed fedmed reports about itself (run by the venv's interpreter).
INSPECT = """
import json, sys
from pathlib import Path
import fedmed
from fedmed.config.compose import config_dir
from fedmed.data import load_site, num_sites
from fedmed.provenance import code_version
from fedmed.runs.compose import compose_config
from fedmed.runs.flower_project import write_app_project
from flwr.cli.build import build_fab_from_disk

datasets = {}
for name in ("heart", "pneumonia", "breast_cancer"):
    cfg = compose_config([f"dataset={name}"])
    datasets[name] = [len(load_site(cfg, i).y_train) for i in range(num_sites(cfg))]
app = write_app_project(Path("server-state") / "flower-app")
print(json.dumps({
    "fedmed": fedmed.__file__,
    "config_dir": str(config_dir()),
    "code_version": code_version(),
    "sys_path": sys.path,
    "datasets": datasets,
    "fab_bytes": len(build_fab_from_disk(app)),
}))
"""


@dataclass(frozen=True)
class Installed:
    """The built distributions, and a venv holding the wheel's fedmed."""

    dist: Path
    venv: Path
    site_packages: Path
    work: Path  # an empty folder outside the checkout: every command runs here

    @property
    def wheel(self) -> Path:
        return _one(self.dist.glob("fedmed-*.whl"))

    @property
    def sdist(self) -> Path:
        return _one(self.dist.glob("fedmed-*.tar.gz"))

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``venv/bin/PROGRAM ARGS`` in the work folder, without the suite's Python setup."""
        return subprocess.run(
            [str(self.venv / "bin" / program), *args],
            cwd=self.work,
            env=_outside_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )


def _one(paths: Any) -> Path:
    found = list(paths)
    assert len(found) == 1, found
    return Path(found[0])


def _outside_env() -> dict[str, str]:
    """This process's environment without the suite's Python set-up (a test before this one
    may have left ``PYTHONPATH`` pointing at the checkout: pip would then find fedmed
    "already satisfied" and install nothing)."""
    hidden = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FEDMED_CONFIG_DIR")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check(command: list[str], cwd: Path) -> str:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, env=_outside_env()
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _source_tree(dest: Path) -> Path:
    """The checkout's files as a clean clone has them (tracked, plus new files git does not
    ignore): no stale build/ folder or egg-info can leak into the distributions."""
    listed = _check(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = _source_tree(root / "source")
    dist = root / "dist"
    # sdist, then the wheel built from it (so the sdist is complete); no build isolation:
    # the suite's setuptools builds, nothing is downloaded.
    _check([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), "."], source)
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = str(venv / "bin" / "python")
    wheel = _one(dist.glob("fedmed-*.whl"))
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    pip.append("--ignore-installed")  # never "already satisfied" by another fedmed
    _check([*pip, str(wheel)], root)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(_check([python, "-c", purelib], root).strip())
    suite = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site_packages / "suite-dependencies.pth").write_text("".join(f"{p}\n" for p in suite))
    work = root / "work"
    work.mkdir()
    return Installed(dist, venv, site_packages, work)


def test_the_distributions_hold_the_config_tree_and_the_bundled_data(
    installed: Installed,
) -> None:
    dists = [str(installed.wheel), str(installed.sdist)]
    _check([sys.executable, "-m", "twine", "check", "--strict", *dists], installed.dist)
    conf = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    bundled = REPO / "fedmed" / "data" / "bundled"
    data = sorted(
        p.relative_to(REPO).as_posix()
        for p in bundled.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert len(conf) > 20 and any(name.endswith(".npz") for name in data)
    in_wheel = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {f"fedmed/{name}" for name in conf} <= in_wheel  # conf/ ships as fedmed.conf
    assert set(data) <= in_wheel
    with tarfile.open(installed.sdist) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
    assert set(conf) | set(data) | {"setup.py", "pyproject.toml"} <= in_sdist


def test_the_wheels_fedmed_is_imported_and_finds_its_own_files(installed: Installed) -> None:
    done = installed.run("python", "-c", INSPECT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["fedmed"]) == installed.site_packages / "fedmed" / "__init__.py"
    assert Path(seen["config_dir"]) == installed.site_packages / "fedmed" / "conf"
    assert seen["code_version"] == VERSION_LINE  # no checkout: says so, does not crash
    assert not [p for p in seen["sys_path"] if p and Path(p).resolve() == REPO]
    assert {name: len(sites) for name, sites in seen["datasets"].items()} == {
        "heart": 4,
        "pneumonia": 4,
        "breast_cancer": 4,
    }
    assert all(n > 0 for sites in seen["datasets"].values() for n in sites)
    assert seen["fab_bytes"] > 0  # `fedmed server run`'s Flower App, built from the wheel


def test_simulate_and_dry_run_from_a_folder_that_is_not_the_checkout(
    installed: Installed,
) -> None:
    simulated = installed.run("fedmed", "simulate", "federation.rounds=2", "hydra.run.dir=sim")
    assert simulated.returncode == 0, simulated.stdout[-3000:] + simulated.stderr[-3000:]
    summary = read_summary(installed.work / "sim")
    assert summary["status"] == "completed" and summary["failures"] == []
    assert summary["rounds_completed"] == 2
    assert set(summary["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    hydra = yaml.safe_load((installed.work / "sim" / ".hydra" / "hydra.yaml").read_text())
    main = [s for s in hydra["hydra"]["runtime"]["config_sources"] if s["provider"] == "main"]
    assert [Path(s["path"]) for s in main] == [installed.site_packages / "fedmed" / "conf"]
    # the installed package explains the run at its sites (Captum and the conf/ tree from
    # the wheel), into the run folder only
    explained = installed.run("fedmed", "explain", "sim", "--site", "va")
    assert explained.returncode == 0, explained.stdout[-3000:] + explained.stderr[-3000:]
    report = json.loads((installed.work / "sim" / "sites" / "va" / "explanation.json").read_text())
    assert report["models"]["global"]["completeness_error"] < 1e-5

    planned = installed.run(
        "fedmed", "dry-run", "privacy=dp", "federation.rounds=2", "hydra.run.dir=dry"
    )
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    projection = json.loads((installed.work / "dry" / "dry_run.json").read_text())
    assert projection["stops_at_round"] is None
    assert [s["site"] for s in projection["sites"]] == ["cleveland", "hungary", "switzerland", "va"]
    for site in projection["sites"]:
        assert not site["refuses"] and site["declines_from_round"] is None
        assert len(site["epsilon_by_round"]) == 2 and 0 < site["epsilon_by_round"][-1] <= 1.0
        assert Path(site["ledger"]).is_relative_to(installed.work)
