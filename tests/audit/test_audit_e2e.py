"""The auditor's toolkit on ledgers from a real heart-disease DP federation (Ray simulation).

One DP run (5 rounds and the private evaluation after the last: 6-line ledgers, long enough
for every attack below) is shared by the module: verify passes, recomputes within 1% and
matches every coordinator receipt; each kind of tampering fails at the right line; a
dishonest (re-signed) epsilon, `steps`, budget or delta is caught by the recomputation, in
both directions; a deleted or tail-truncated ledger fails against the coordinator's receipts
and the site's high-water mark, and the site refuses to train on it (one second, one-round
run on copies of the ledgers); the report takes the auditor's keys and tells this run's
entries from the lifetime context; the statement renders in headless Chromium, its plot with
a clear panel per site; dry-run predicts the ledgers exactly and reads them without writing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from fedmed.audit.report import epsilon_plot_png
from fedmed.audit.verify import TOLERANCE, verify_all, verify_ledger
from fedmed.privacy.ledger import HighWaterMark, append_entry, read_verified, write_mark
from tests.browser import C0_BLUE, pixels_of, render
from tests.e2e import read_summary, run_fedmed
from tests.figures import Saved, assert_one_clear_panel_per_site

pytestmark = [pytest.mark.slow, pytest.mark.cost(230)]  # seconds, the file alone on 2 cores
ROUNDS = 5
ENTRIES = ROUNDS + 1  # a ledger: 5 trained rounds, then the evaluation after round 5
SITES = ("cleveland", "hungary", "switzerland", "va")
RUN_ARGS = ["dataset=heart", "model=svm", "privacy=dp", f"federation.rounds={ROUNDS}"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dp_run")
    proc = run_fedmed("simulate", *RUN_ARGS, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _copy_ledger(run_dir: Path, tmp_path: Path, site: str = "cleveland") -> Path:
    for suffix in (".jsonl", ".pub", ".key", ".mark"):
        shutil.copy(run_dir / "ledgers" / f"{site}.ledger{suffix}", tmp_path)
    return tmp_path / f"{site}.ledger.jsonl"


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """The run's ledgers (with keys and marks) and the coordinator's receipts."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "ledgers", copy / "ledgers")
    for name in ("receipts.jsonl", "receipts.pub"):
        shutil.copy(run_dir / name, copy)
    return copy


def _rewrite_signed(ledger: Path, line: int | None, **changes: Any) -> None:
    """What a dishonest site could do with its own key: change an entry (``None``: every
    entry) and re-sign the chain and its high-water mark."""
    key = serialization.load_pem_private_key(ledger.with_suffix(".key").read_bytes(), None)
    entries = [json.loads(x) for x in _lines(ledger)]
    for number, entry in enumerate(entries, start=1):
        if line is None or number == line:
            entry.update(changes)
    ledger.unlink()
    prev = "0" * 64
    for entry in entries:
        fields = {k: v for k, v in entry.items() if k not in ("prev_hash", "hash", "signature")}
        prev = append_entry(ledger, fields, key, prev)["hash"]  # type: ignore[arg-type]
    site = str(entries[0]["site"])
    mark = HighWaterMark(site, str(ledger), len(entries), prev, "re-signed")
    write_mark(ledger.with_suffix(".mark"), key, mark)  # type: ignore[arg-type]


def test_verify_passes_and_recomputes_every_epsilon_within_one_percent(dp_run: Path) -> None:
    proc = run_fedmed("audit", "verify", str(dp_run), "--json", "-")
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and len(result["ledgers"]) == 4
    assert result["independent_accountants"]["library"] == "dp-accounting"
    # the coordinator's receipts, picked up from the run folder: one per site and release
    [receipts] = result["receipts"]
    assert receipts["ok"] and len(receipts["receipts"]) == 4 * ENTRIES
    for ledger in result["ledgers"]:
        assert [e["round"] for e in ledger["entries"]] == [*range(1, ROUNDS + 1), ROUNDS]
        assert [e["split"] for e in ledger["entries"]] == ["train"] * ROUNDS + ["evaluation"]
        assert ledger["entries"][-1]["mechanism"] == "gaussian_evaluation_counts"
        assert ledger["receipts"] == ENTRIES and ledger["mark_entries"] == ENTRIES
        for e in ledger["entries"]:
            assert abs(e["recorded_epsilon"] - e["pld_epsilon"]) <= TOLERANCE * e["pld_epsilon"]
            assert e["pld_epsilon"] <= e["rdp_epsilon"]  # RDP is the looser bound
    table = run_fedmed("audit", "verify", str(dp_run / "ledgers" / "va.ledger.jsonl"))
    assert table.returncode == 0 and "verdict: PASS: 1 of 1" in table.stdout


# Each kind of tampering, and the line where the chain first breaks.
TAMPERING = {"edit": 2, "delete": 2, "reorder": 2, "insert": 2, "truncate": 3}


def _tamper(ledger: Path, kind: str) -> None:
    lines = _lines(ledger)
    if kind == "edit":
        lines[1] = lines[1].replace('"steps":', '"steps":1', 1)
    elif kind == "delete":
        del lines[1]
    elif kind == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif kind == "insert":
        lines.insert(1, lines[0])
    else:
        lines[2] = lines[2][: len(lines[2]) // 2]
    ledger.write_text("".join(lines))


def _section(output: str, ledger: Path) -> str:
    """What `fedmed audit verify` says about one of several ledgers: its header line (which
    starts with the ledger's path) and the indented findings below it."""
    lines = output.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith(f"{ledger} ")]
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), None)
    return "\n".join(lines[start:end])


@pytest.fixture(scope="module")
def tampered(
    dp_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Path], subprocess.CompletedProcess[str]]:
    """A copy of Cleveland's ledger per kind of tampering, and one `fedmed audit verify` of
    all of them (one start-up instead of five; each ledger's findings are under its path)."""
    ledgers = {}
    for kind in TAMPERING:
        ledgers[kind] = _copy_ledger(dp_run, tmp_path_factory.mktemp(kind))
        _tamper(ledgers[kind], kind)
    return ledgers, run_fedmed("audit", "verify", *map(str, ledgers.values()))


@pytest.mark.parametrize(("kind", "bad_line"), TAMPERING.items())
def test_each_kind_of_tampering_fails_at_the_right_line(
    tampered: tuple[dict[str, Path], subprocess.CompletedProcess[str]], kind: str, bad_line: int
) -> None:
    ledgers, proc = tampered
    audit = verify_ledger(ledgers[kind])
    assert not audit.ok
    assert [(f.check, f.line) for f in audit.findings] == [("integrity", bad_line)]
    assert proc.returncode == 1
    section = _section(proc.stdout, ledgers[kind])
    assert f"line {bad_line}" in section, section


def test_a_re_signed_epsilon_edited_downward_is_caught_by_the_recomputation(
    dp_run: Path, tmp_path: Path
) -> None:
    ledger = _copy_ledger(dp_run, tmp_path)
    honest = json.loads(_lines(ledger)[1])["epsilon"]
    _rewrite_signed(ledger, 2, epsilon=honest * 0.95, record_epsilon=honest * 0.95)
    audit = verify_ledger(ledger)
    assert [(f.check, f.line) for f in audit.findings] == [("recomputation", 2)]
    assert "below the independent PLD epsilon" in audit.findings[0].message


def test_a_re_signed_steps_edit_is_caught_by_the_recomputation(
    dp_run: Path, tmp_path: Path
) -> None:
    """The attack: `steps` set to 1 in every entry and the chain re-signed with the site's key
    (the mark too); the recorded training epsilons stay, now ~2.5x what the entries' fields
    give (the evaluation entry was one step already, and stays honest)."""
    run = _copy_run(dp_run, tmp_path)
    ledger = run / "ledgers" / "switzerland.ledger.jsonl"
    _rewrite_signed(ledger, None, steps=1)
    audit = verify_ledger(ledger)
    assert [(f.check, f.line) for f in audit.findings] == [
        ("recomputation", n) for n in range(1, ROUNDS + 1)
    ]
    assert all("above the independent PLD epsilon" in f.message for f in audit.findings)
    assert all(e.recorded_epsilon > 2 * e.pld_epsilon for e in audit.entries if e.split == "train")
    # The receipts miss the re-signed entries too: every hash changed.
    proc = run_fedmed("audit", "verify", str(run))
    assert proc.returncode == 1
    assert proc.stdout.count("site 'switzerland' round") == ENTRIES, proc.stdout[-3000:]


def _entries(ledger: Path) -> list[tuple[int, str]]:
    """(round, hash) of each line."""
    return [(entry["round"], entry["hash"]) for entry in map(json.loads, _lines(ledger))]


def test_a_deleted_or_tail_truncated_ledger_fails_against_the_receipts_and_the_mark(
    dp_run: Path, tmp_path: Path
) -> None:
    """`head -n 4` of a 6-line ledger is a valid chain (it passed before); deleting a ledger
    left nothing to verify. The coordinator's receipts name every missing entry."""
    run = _copy_run(dp_run, tmp_path)
    ledgers = run / "ledgers"
    hungary, switzerland = ledgers / "hungary.ledger.jsonl", ledgers / "switzerland.ledger.jsonl"
    lost = {"hungary": _entries(hungary)[4:], "switzerland": _entries(switzerland)}
    hungary.write_text("".join(_lines(hungary)[:4]))
    switzerland.unlink()
    assert len(read_verified_beside(hungary)) == 4  # the chain alone is valid
    proc = run_fedmed("audit", "verify", str(run))
    assert proc.returncode == 1
    for site, entries in lost.items():
        for rnd, entry in entries:
            assert f"site '{site}' round {rnd}, entry {entry}" in proc.stdout, (site, rnd)
    assert "holds 4 entries, but the site's high-water mark" in proc.stdout  # hungary's mark
    # Without the mark (removed too), the explicit receipts still find the cut.
    (ledgers / "hungary.ledger.mark").unlink()
    proc = run_fedmed(
        "audit", "verify", str(hungary), "--receipts", str(run / "receipts.jsonl"), "--json", "-"
    )
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["ledgers"][0]["mark"] is None
    missing = [f for f in result["ledgers"][0]["findings"] if f["check"] == "receipt"]
    assert len(missing) == ENTRIES - 4
    assert all("not in this ledger" in f["message"] for f in missing)


@pytest.fixture(scope="module")
def rerun(dp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second, one-round run (budget 2) on copies of the first run's ledgers, after
    Switzerland's ledger was deleted (its .pub and mark still there) and Hungary's cut to
    its first 4 lines: (ledger folder, run folder)."""
    folder = tmp_path_factory.mktemp("rerun")
    ledgers, run_dir = folder / "ledgers", folder / "run"
    shutil.copytree(dp_run / "ledgers", ledgers)
    (ledgers / "switzerland.ledger.jsonl").unlink()
    hungary = ledgers / "hungary.ledger.jsonl"
    hungary.write_text("".join(_lines(hungary)[:4]))
    proc = run_fedmed(
        "simulate",
        *RUN_ARGS[:3],
        "federation.rounds=1",
        f"privacy.ledger_dir={ledgers}",
        "privacy.budget_epsilon=2",
        f"hydra.run.dir={run_dir}",
    )
    assert (run_dir / "summary.json").is_file(), proc.stderr[-3000:]
    return ledgers, run_dir


def test_a_site_refuses_to_train_on_a_deleted_or_truncated_ledger(
    rerun: tuple[Path, Path],
) -> None:
    ledgers, run_dir = rerun
    failures = {f["site"]: f["error"] for f in read_summary(run_dir)["failures"]}
    assert set(failures) == {"hungary", "switzerland"}, failures
    assert "is missing, but the site's high-water mark" in failures["switzerland"]
    assert "holds 4 entries, but the site's high-water mark" in failures["hungary"]
    for error in failures.values():
        assert "restore the ledger from the site's backup" in error
    assert not (ledgers / "switzerland.ledger.jsonl").exists()  # no new genesis entry
    assert len(_lines(ledgers / "hungary.ledger.jsonl")) == 4
    for site in ("cleveland", "va"):  # the intact sites trained on, and evaluated
        assert len(_lines(ledgers / f"{site}.ledger.jsonl")) == ENTRIES + 2


def test_the_report_takes_the_auditors_keys_and_separates_this_run_from_the_lifetime(
    dp_run: Path, rerun: tuple[Path, Path], tmp_path: Path
) -> None:
    """The rerun's statement: its 4 receipted entries (cleveland's and va's round and
    evaluation) are this run's, the 12 entries of the first run are the lifetime context; the
    keys are the auditor's copies (first run's)."""
    _, run_dir = rerun
    keys = [f"{s}={dp_run / 'ledgers' / f'{s}.ledger.pub'}" for s in ("cleveland", "va")]
    args = [x for key in keys for x in ("--public-key", key)]
    proc = run_fedmed("audit", "report", str(run_dir), *args, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    markdown = (tmp_path / "privacy_statement.md").read_text()
    this_run = markdown.split("## This run's entries")[1].split("## Lifetime context")[0]
    lifetime = markdown.split("## Lifetime context")[1].split("## What the coordinator")[0]
    rows = [line for line in this_run.splitlines() if line.startswith("| cleveland")]
    assert len(rows) == 2 and "4 coordinator receipt(s) cross-checked" in markdown
    assert sum(line.startswith(("| cleveland", "| va")) for line in lifetime.splitlines()) == (
        2 * ENTRIES
    )
    assert "verified with the auditor's key" in markdown
    # The wrong key for a site (another site's) fails the statement.
    wrong = [*args[:-1], f"va={dp_run / 'ledgers' / 'hungary.ledger.pub'}"]
    proc = run_fedmed("audit", "report", str(run_dir), *wrong, "--out", str(tmp_path / "w"))
    assert proc.returncode == 1
    assert "bad signature" in (tmp_path / "w" / "privacy_statement.md").read_text()


def test_budget_overruns_and_a_delta_above_one_over_n_are_flagged(
    dp_run: Path, tmp_path: Path
) -> None:
    ledger = _copy_ledger(dp_run, tmp_path)
    _rewrite_signed(ledger, 3, budget_epsilon=0.5, dataset_size=5000)
    checks = {(f.check, f.line) for f in verify_ledger(ledger).findings}
    assert checks == {("budget", 3), ("delta", 3)}


def test_a_wrong_public_key_fails_the_first_line(dp_run: Path) -> None:
    ledgers = dp_run / "ledgers"
    proc = run_fedmed(
        "audit",
        "verify",
        str(ledgers / "va.ledger.jsonl"),
        "--public-key",
        str(ledgers / "hungary.ledger.pub"),
    )
    assert proc.returncode == 1 and "line 1" in proc.stdout and "bad signature" in proc.stdout


def test_the_privacy_statement_renders_in_headless_chromium(dp_run: Path, tmp_path: Path) -> None:
    proc = run_fedmed("audit", "report", str(dp_run), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    markdown = (tmp_path / "privacy_statement.md").read_text()
    for needed in (
        "Verification verdict: PASS",
        "Unit of privacy",
        "dp_sgd_poisson_gaussian",
        "opacus",
        "dp-accounting",
        "Secure aggregation was off",
        "config hash",
        "privacy_statement_epsilon.png",
    ):
        assert needed in markdown, needed
    html = (tmp_path / "privacy_statement.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("https://", "")
    pixels, dom = render(tmp_path / "privacy_statement.html", tmp_path)
    assert "Verification verdict: PASS" in dom and "<table>" in dom
    assert pixels.std() > 10  # not a blank page
    # The embedded plot drew its first site in matplotlib's C0 blue: the page itself uses
    # only greys, so blue pixels mean the embedded image rendered.
    assert pixels_of(pixels, C0_BLUE) > 100


def test_the_statements_plot_gives_each_site_a_clear_panel(
    dp_run: Path, saved_figures: list[Saved]
) -> None:
    """The four sites calibrate to the same target, so their curves coincide: on one shared
    axes an auditor saw only VA's line, under the legend."""
    ledgers = sorted((dp_run / "ledgers").glob("*.ledger.jsonl"))
    epsilon_plot_png(verify_all(ledgers))
    [saved] = saved_figures
    assert_one_clear_panel_per_site(saved, sorted(SITES))
    # per split recorded and independent PLD, and the budget
    assert saved.lines == [5] * len(SITES)


def test_dry_run_predicts_the_ledgers_and_writes_nothing(dp_run: Path, tmp_path: Path) -> None:
    proc = run_fedmed("dry-run", *RUN_ARGS, f"hydra.run.dir={tmp_path / 'fresh'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    projection = json.loads((tmp_path / "fresh" / "dry_run.json").read_text())
    summary = read_summary(dp_run)
    for site in projection["sites"]:
        ledger = Path(summary["sites"][site["site"]]["privacy"]["ledger"])
        entries = read_verified_beside(ledger)
        recorded = [e["epsilon"] for e in entries if e["split"] == "train"]
        assert np.allclose(site["epsilon_by_round"], recorded, rtol=1e-9), site["site"]
        [evaluation] = [e for e in entries if e["split"] == "evaluation"]
        projected = site["evaluation_epsilon_by_round"]
        assert projected.keys() == {str(ROUNDS)}
        assert projected[str(ROUNDS)] == pytest.approx(evaluation["epsilon"], rel=1e-9)

    # Against what the run spent: a second run would cross a lifetime budget of 1.2.
    ledgers = dp_run / "ledgers"
    before = {p.name: p.read_bytes() for p in ledgers.iterdir()}
    proc = run_fedmed(
        "dry-run",
        *RUN_ARGS,
        f"privacy.ledger_dir={ledgers}",
        "privacy.budget_epsilon=1.2",
        f"hydra.run.dir={tmp_path / 'spent'}",
    )
    assert proc.returncode == 1
    projection = json.loads((tmp_path / "spent" / "dry_run.json").read_text())
    assert projection["stops_at_round"] is not None
    assert all(s["declines_from_round"] is not None for s in projection["sites"])
    assert all(s["evaluation_declines_from_round"] == ROUNDS for s in projection["sites"])
    assert "would stop in round" in proc.stdout and "declines" in proc.stdout
    assert {p.name: p.read_bytes() for p in ledgers.iterdir()} == before


def read_verified_beside(ledger: Path) -> list[dict[str, Any]]:
    from fedmed.privacy.ledger import load_public_key

    return read_verified(ledger, load_public_key(ledger.with_suffix(".pub")))


def test_the_empirical_audit_flags_a_run_without_noise(tmp_path: Path) -> None:
    """With noise on, bounds stay below the claim: benchmarks/audit.py (RESULTS.md)."""
    proc = run_fedmed(
        "audit",
        "empirical",
        *RUN_ARGS[:3],
        "federation.rounds=2",
        "audit.disable_noise=true",
        f"hydra.run.dir={tmp_path}",
    )
    report = json.loads((tmp_path / "empirical_audit.json").read_text())
    assert report["canaries"] == 1000 and 400 < report["included"] < 600
    assert proc.returncode == 1 and "VIOLATION" in proc.stdout, proc.stderr[-2000:]
    assert report["epsilon_lower_bound"] > report["formal_epsilon"] > 0
