"""Bad input at the command line: one clear line naming the file, key or argument, exit code 2,
no stack trace, and nothing started. The real ``fedmed`` CLI in a subprocess, as a user runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.e2e import REPO, run_fedmed


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
