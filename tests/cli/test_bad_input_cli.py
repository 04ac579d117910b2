"""Bad input at the command line: one clear line naming the file, key or argument, exit code 2,
no stack trace, and nothing started. The real ``fedmed`` CLI in a subprocess, as a user runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import REPO, run_fedmed

pytestmark = pytest.mark.cost(65)  # seconds, the file alone on 2 cores


def _kit_with(tmp_path: Path, **deployment: str) -> Path:
    """VA's kit with real certificates and keys, except the ``deployment`` paths given."""
    pki = tmp_path / "pki"
    for args in (["init-ca"], ["site", "va"]):
        assert run_fedmed("certs", *args, "--dir", str(pki)).returncode == 0
    kit = yaml.safe_load((REPO / "sites" / "va.yaml").read_text())
    kit["deployment"] = {
        "ca_cert": str(pki / "ca.crt"),
        "node_key": str(pki / "sites" / "va" / "node.key"),
        "node_public_key": str(pki / "sites" / "va" / "node.pub"),
        "runtime_port": 9097,
        **deployment,
    }
    path = tmp_path / "va.yaml"
    path.write_text(yaml.safe_dump(kit))
    return path


def _bad_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["simulate", "federation.num_sites=0"], "federation.num_sites=0 is not allowed"),
        (["simulate", "secagg=secaggplus", "secagg.num_shares=3",
          "secagg.reconstruction_threshold=4"], "secagg.reconstruction_threshold=4"),
        (["simulate", "privacy=dp", "privacy.delta=1.5"], "privacy.delta=1.5"),
        (["dry-run", "privacy=dp", "privacy.target_epsilon=-1"], "privacy.target_epsilon=-1.0"),
        (["simulate", "federation.rounds=three"], "federation.rounds"),
        (["simulate", "dataset=nowhere"], "dataset"),
        (["audit", "verify", "/nonexistent/va.ledger.jsonl"], "/nonexistent/va.ledger.jsonl"),
        (["server", "run", "--kit", "/nonexistent/server.yaml"], "/nonexistent/server.yaml"),
        (["site", "start", "/nonexistent/va.yaml"], "site kit /nonexistent/va.yaml"),
        (["certs", "site"], "the following arguments are required: name, --dir"),
        (["frobnicate"], "frobnicate"),
    ],
)  # fmt: skip
def test_bad_arguments_get_one_line_naming_what_is_wrong(args: list[str], expected: str) -> None:
    proc = run_fedmed(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


BAD_OVERRIDE = "cannot parse the override 'federation.rounds==3' (extraneous input '=')"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["simulate", "federation.rounds==3"], BAD_OVERRIDE),
        (["baseline", "federation.rounds==3"], BAD_OVERRIDE),
        (["dry-run", "privacy=dp", "federation.rounds==3"], BAD_OVERRIDE),
        (["audit", "empirical", "federation.rounds==3"], BAD_OVERRIDE),
        (["server", "run", "federation.rounds==3"], BAD_OVERRIDE),
        (["simulate", "--multirun", "seed=0,1", "model=[svm"], "override 'model=[svm'"),
        (["simulate", "--multirun", "seed=range(3,1)"], "cannot sweep the override"),
        (["simulate", "seed=0,1"], "the override 'seed=0,1' is a sweep; add --multirun"),
    ],
)  # fmt: skip
def test_a_malformed_override_gets_one_line_naming_it(args: list[str], expected: str) -> None:
    proc = run_fedmed(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("key", ["ca_cert", "node_key", "node_public_key"])
def test_a_site_kit_with_a_missing_key_file_is_refused_before_starting(
    tmp_path: Path, key: str
) -> None:
    missing = str(tmp_path / "absent.file")
    kit = _kit_with(tmp_path, **{key: missing})
    proc = run_fedmed("site", "start", str(kit), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"site 'va': deployment.{key}: file not found ({missing})" in proc.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "file is empty"),
        ("age,num\n", "no data rows"),
        ("age,sex,num\n63,1,0\n67,1\n", "line 3 has 2 columns"),
        ("age,sex,num\n63,x,0\n67,1,2\n", "column 'sex': non-numeric value 'x'"),
        ("age,sex,num\n63,1,1\n67,1,2\n", "every row has label"),
    ],
)
def test_a_bad_site_file_stops_the_run_before_training(
    tmp_path: Path, content: str, expected: str
) -> None:
    data = _bad_file(tmp_path, content)
    proc = run_fedmed(
        "simulate", "dataset=csv", f"dataset.path={data}", "dataset.label=num",
        "dataset.binarize_above=0", "privacy=dp", f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(data) in proc.stderr and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "ledgers").exists()  # nothing trained, nothing recorded


HEART_HEADER = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"


def _duplicate_header(lines: list[str]) -> list[str]:
    return [HEART_HEADER.replace("chol", "trestbps"), *lines]


def _overflowing_value(lines: list[str]) -> list[str]:
    lines[49] = "1e308" + lines[49][lines[49].index(",") :]  # age on line 51 (after the header)
    return [HEART_HEADER, *lines]


def _semicolons(lines: list[str]) -> list[str]:
    return [line.replace(",", ";") for line in [HEART_HEADER, *lines]]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_duplicate_header, "columns 4 and 5 of the header row are both named 'trestbps'"),
        (_overflowing_value, "line 51, column 'age': value 1e+308 overflows"),
        (_semicolons, "the file looks ';'-separated (Excel in some locales)"),
    ],
)
def test_a_silently_corrupting_heart_file_is_refused_before_training(
    tmp_path: Path, heart_copies: Any, edit: Any, expected: str
) -> None:
    cleveland, hungary = heart_copies("sites")[:2]
    cleveland.write_text("\n".join(edit(cleveland.read_text().splitlines())) + "\n")
    hungary.write_text(HEART_HEADER + "\n" + hungary.read_text())
    proc = run_fedmed(
        "simulate", "dataset=csv", f"dataset.paths=[{cleveland},{hungary}]", "dataset.label=num",
        "dataset.binarize_above=0", "privacy=dp", f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert f"data error in {cleveland}: " in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "ledgers").exists()  # nothing trained, nothing recorded
