"""The signed, hash-chained ledger: durable appends, and every kind of tampering is caught."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmed.audit.verify import verify_ledger
from fedmed.errors import SiteError
from fedmed.privacy.accounting import DPSteps
from fedmed.privacy.budget import PrivacyAccount, SitePolicy
from fedmed.privacy.ledger import (
    GENESIS_HASH,
    LedgerEntry,
    LedgerError,
    append_entry,
    append_marked,
    load_or_create_signing_key,
    load_public_key,
    mark_path,
    open_ledger,
    read_entries,
    read_mark,
    read_verified,
    write_mark,
)
from fedmed.records import RecordError
from fedmed.runs.compose import compose_config
from fedmed.site.client import HospitalSite, SiteRuntime


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    key = load_or_create_signing_key(tmp_path / "site.key", tmp_path / "site.pub")
    path = tmp_path / "ledger.jsonl"
    prev = GENESIS_HASH
    for rnd in (1, 2, 3):
        prev = append_entry(path, {"site": "va", "round": rnd, "epsilon": 0.1 * rnd}, key, prev)[
            "hash"
        ]
    return path, tmp_path / "site.pub", key


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_ledger_verifies_and_key_is_private(
    ledger: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    path, pub, _ = ledger
    entries = read_verified(path, load_public_key(pub))
    assert [e["round"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS_HASH and entries[1]["prev_hash"] == entries[0]["hash"]
    assert stat.S_IMODE((pub.parent / "site.key").stat().st_mode) == 0o600


def _expect_bad_line(path: Path, pub: Path, line: int, words: str) -> None:
    with pytest.raises(LedgerError, match=rf"line {line}: .*{words}") as info:
        read_verified(path, load_public_key(pub))
    assert info.value.line == line


def test_edit_is_caught_at_its_line(ledger: tuple[Path, Path, Ed25519PrivateKey]) -> None:
    path, pub, _ = ledger
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["epsilon"] = 0.01  # an auditor-fooling downward edit
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    _expect_bad_line(path, pub, 2, "edited")


def test_deletion_reorder_and_insertion_break_the_chain(
    ledger: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    path, pub, _ = ledger
    original = _lines(path)
    path.write_text(original[0] + original[2])
    _expect_bad_line(path, pub, 2, "chain")
    path.write_text(original[1] + original[0] + original[2])
    _expect_bad_line(path, pub, 1, "chain")
    path.write_text(original[0] + original[1] + original[1] + original[2])
    _expect_bad_line(path, pub, 3, "chain")


def test_truncation_is_caught(ledger: tuple[Path, Path, Ed25519PrivateKey]) -> None:
    path, pub, _ = ledger
    path.write_bytes(path.read_bytes()[:-20])
    _expect_bad_line(path, pub, 3, "truncated")


def test_entries_signed_by_another_key_are_refused(
    ledger: tuple[Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    path, pub, _ = ledger
    other = Ed25519PrivateKey.generate()
    last = json.loads(_lines(path)[-1])
    forged = append_entry(
        tmp_path / "forged.jsonl", {"site": "va", "round": 4, "epsilon": 0.0}, other, last["hash"]
    )
    path.write_text(
        path.read_text() + json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n"
    )
    _expect_bad_line(path, pub, 4, "signature")


def test_unwritable_ledger_raises_ledger_error(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the ledger folder should be")
    with pytest.raises(LedgerError, match="cannot write"):
        append_entry(blocked / "ledger.jsonl", {"round": 1}, key, GENESIS_HASH)


def test_a_write_cut_short_by_the_file_system_is_rolled_back(
    ledger: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    """A real kernel refusal mid-write (file size limit: EFBIG, as a full disk gives ENOSPC):
    the append fails with one clear error and the ledger still verifies, entries intact."""
    path, pub, _ = ledger
    size = path.stat().st_size
    script = f"""
import resource, signal
from pathlib import Path
from fedmed.privacy.ledger import LedgerError, append_entry, load_or_create_signing_key
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
key = load_or_create_signing_key(Path({str(path.parent / "site.key")!r}), Path({str(pub)!r}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({size} + 40, {size} + 40))
prev = {json.loads(_lines(path)[-1])["hash"]!r}
try:
    append_entry(Path({str(path)!r}), {{"site": "va", "round": 4, "pad": "x" * 200}}, key, prev)
except LedgerError as err:
    print(err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"privacy ledger {path}: cannot write the entry (File too large)" in proc.stdout
    assert path.stat().st_size == size
    assert [e["round"] for e in read_verified(path, load_public_key(pub))] == [1, 2, 3]


def test_a_site_whose_ledger_cannot_be_written_declines_before_training(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the ledger folder should be")
    cfg = compose_config(["dataset=heart", "model=svm", "privacy=dp"])
    site = HospitalSite(cfg, 0, SiteRuntime("run", blocked / "ledgers", deployed=False))
    with pytest.raises(SiteError, match=r"cannot be written .*will not train unrecorded") as err:
        site.fit([], {"server_round": 1})
    assert str(blocked / "ledgers" / "cleveland.ledger.jsonl") in str(err.value)


# ------------------------------------------------------------------ the high-water mark
@pytest.fixture
def marked(tmp_path: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    """A three-entry ledger written the way a site writes it: every entry moves the mark."""
    key = load_or_create_signing_key(tmp_path / "keys" / "site.key", tmp_path / "site.pub")
    path, mark = tmp_path / "ledger.jsonl", mark_path(tmp_path / "keys" / "site.key")
    entries: list[dict[str, Any]] = []
    for rnd in (1, 2, 3):
        entries.append(append_marked(path, mark, {"site": "va", "round": rnd}, key, entries))
    return path, mark, key


def test_the_mark_lives_beside_the_signing_key_and_counts_every_entry(
    marked: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    path, mark, key = marked
    assert mark == mark.parent / "site.mark" and mark.parent.name == "keys"
    written = read_mark(mark, key.public_key())
    assert written is not None and written.entries == 3
    assert written.head == json.loads(_lines(path)[-1])["hash"]
    assert [e["round"] for e in open_ledger(path, mark, key, "va")] == [1, 2, 3]


def test_a_deleted_ledger_is_refused_with_how_to_restore_it(
    marked: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    path, mark, key = marked
    path.unlink()
    with pytest.raises(
        LedgerError, match=r"is missing, but the site's high-water mark .* records 3 entries"
    ):
        open_ledger(path, mark, key, "va")
    with pytest.raises(LedgerError, match=r"restore the ledger from the site's backup"):
        open_ledger(path, mark, key, "va")
    assert not path.exists()  # never silently started over


def test_a_tail_truncated_or_replaced_ledger_is_refused(
    marked: tuple[Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    path, mark, key = marked
    original = path.read_text()
    path.write_text("".join(_lines(path)[:2]))  # head -n 2: a valid, shorter chain
    assert len(read_verified(path, key.public_key())) == 2
    with pytest.raises(LedgerError, match=r"holds 2 entries, but .* records 3: the last 1 were"):
        open_ledger(path, mark, key, "va")
    # Another ledger of the same length, signed with the same key (an older copy, re-signed)
    path.unlink()
    entries: list[dict[str, Any]] = []
    for rnd in (1, 2, 3):
        fields = {"site": "va", "round": rnd, "epsilon": 0.0}
        entries.append(
            append_entry(path, {**fields}, key, entries[-1]["hash"] if entries else GENESIS_HASH)
        )
    with pytest.raises(
        LedgerError, match=r"entry 3 has hash .* this is not the ledger the site wrote"
    ):
        open_ledger(path, mark, key, "va")
    path.write_text(original)
    assert len(open_ledger(path, mark, key, "va")) == 3


def test_an_edited_mark_is_refused(marked: tuple[Path, Path, Ed25519PrivateKey]) -> None:
    path, mark, key = marked
    data = json.loads(mark.read_text())
    data["entries"] = 1  # someone lowers the mark to go with a truncated ledger
    mark.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=r"high-water mark is not signed by this site's key"):
        open_ledger(path, mark, key, "va")


def test_a_ledger_from_before_marks_gets_one_from_its_verified_content(
    ledger: tuple[Path, Path, Ed25519PrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    """The fixture's ledger was written without a mark (as fedmed did before it kept one)."""
    path, _, key = ledger
    mark = mark_path(path.parent / "site.key")
    assert not mark.exists()
    with caplog.at_level("WARNING", logger="fedmed.privacy.ledger"):
        assert len(open_ledger(path, mark, key, "va")) == 3
    assert "no high-water mark yet" in caplog.text
    written = read_mark(mark, key.public_key())
    assert written is not None and written.entries == 3
    path.write_text("".join(_lines(path)[:1]))
    with pytest.raises(LedgerError, match="holds 1 entries"):
        open_ledger(path, mark, key, "va")


CRASH = """
import os, sys
from pathlib import Path
import fedmed.privacy.ledger as ledger
key = ledger.load_or_create_signing_key(Path(sys.argv[1]), Path(sys.argv[2]))
path, mark = Path(sys.argv[3]), ledger.mark_path(Path(sys.argv[1]))
entries = ledger.open_ledger(path, mark, key, "va")
real_replace = os.replace
def power_cut(*args):  # the entry is on disk; the new mark is written but not yet renamed
    os._exit(9)
os.replace = power_cut
ledger.append_marked(path, mark, {"site": "va", "round": 4}, key, entries)
"""


def test_a_crash_between_the_entry_and_its_mark_does_not_brick_the_site(
    marked: tuple[Path, Path, Ed25519PrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    """The rule: the mark may lag the ledger; the entries after it verify like any line, and
    the mark rolls forward. A lagging mark with a forged last entry is still refused."""
    path, mark, key = marked
    key_file, pub = mark.with_suffix(".key"), path.parent / "site.pub"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(key_file), str(pub), str(path)], capture_output=True
    )
    assert proc.returncode == 9, proc.stderr
    lagging = read_mark(mark, key.public_key())
    assert lagging is not None and lagging.entries == 3  # the old mark survived whole
    assert mark.with_name(mark.name + ".tmp").exists()  # the unrenamed new one is ignored
    assert len(_lines(path)) == 4
    with caplog.at_level("WARNING", logger="fedmed.privacy.ledger"):
        assert [e["round"] for e in open_ledger(path, mark, key, "va")] == [1, 2, 3, 4]
    assert "rolling the mark forward" in caplog.text
    rolled = read_mark(mark, key.public_key())
    assert rolled is not None and rolled.entries == 4
    # The same lag, but the unmarked last entry is not the site's: refused at its line.
    path.write_text("".join(_lines(path)[:3]))
    write_mark(mark, key, lagging)
    other = Ed25519PrivateKey.generate()
    forged = append_entry(
        path.with_name("forged.jsonl"), {"site": "va", "round": 4}, other, lagging.head
    )
    with path.open("a") as handle:
        handle.write(json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n")
    with pytest.raises(LedgerError, match=r"line 4: bad signature"):
        open_ledger(path, mark, key, "va")


# ------------------------------------------------------------------ the typed entry
# Two entries written by PrivacyAccount.record before LedgerEntry existed (fedmed 29c18e6,
# when the entry was a dict): the schema as sites have it on disk.
OLD_LEDGER = Path(__file__).parent / "data" / "cleveland.ledger.jsonl"
CHAIN = ("prev_hash", "hash", "signature")


def test_a_ledger_written_before_ledger_entry_reads_back_byte_for_byte() -> None:
    entries = read_entries(OLD_LEDGER, load_public_key(OLD_LEDGER.with_suffix(".pub")))
    assert [e.to_json() + "\n" for e in entries] == _lines(OLD_LEDGER)
    first, second = entries
    assert (first.site, first.round, first.steps, first.extra) == ("cleveland", 1, 15, {})
    assert second.prev_hash == first.hash and first.prev_hash == GENESIS_HASH
    assert first.accountant_name == "prv" and first.eps_error == "0.0025 x RDP epsilon"
    assert first.dp_steps == DPSteps(1.99, 16 / 227, 15)
    assert LedgerEntry.from_json(_lines(OLD_LEDGER)[1]) == second
    assert verify_ledger(OLD_LEDGER).ok


def test_the_writer_still_writes_the_lines_it_wrote_before(tmp_path: Path) -> None:
    """The old writer's keys plus only the new optional ones (the schema grows), and the
    entry it returns is the line."""
    policy = SitePolicy(
        "cleveland", 10.0, 1e-3, "prv", tmp_path / "c.ledger.jsonl", tmp_path / "k" / "c.key"
    )
    account = PrivacyAccount(policy)
    plan = DPSteps(1.99, 16 / 227, 15)
    entry = account.record(
        plan, account.epsilon(plan), run_id="r", server_round=1, dataset_size=227,
        sensitivity=1.0, config_hash="0123456789abcdef", code_version="fedmed test",
    )  # fmt: skip
    [line] = _lines(policy.ledger)
    new_keys = {"split", "sensitivity", "record_epsilon"}  # since private evaluation
    assert set(json.loads(line)) == set(json.loads(_lines(OLD_LEDGER)[0])) | new_keys
    assert json.loads(line)["max_grad_norm"] == 1.0 and entry.split_name == "train"
    assert entry.to_json() + "\n" == line and entry.hash == json.loads(line)["hash"]
    assert PrivacyAccount(policy).entries == [entry]


def _signed(path: Path, fields: dict[str, Any]) -> str:
    key = load_or_create_signing_key(path.with_suffix(".key"), path.with_suffix(".pub"))
    append_entry(path, fields, key, GENESIS_HASH)
    return _lines(path)[0]


def test_an_entry_lacking_newer_fields_parses_and_a_newer_writers_keys_are_kept(
    tmp_path: Path,
) -> None:
    """The schema only grows: an entry without the optional fields (as an older writer may
    have left them out) reads with their defaults, and keys this version does not know are
    kept verbatim, so the line still verifies and is written back byte for byte."""
    old = {k: v for k, v in json.loads(_lines(OLD_LEDGER)[0]).items() if k not in CHAIN}
    bare = {k: v for k, v in old.items() if k not in ("accountant", "max_grad_norm")}
    newer = {**bare, "clipping": {"kind": "per_layer"}, "zz_note": "from a newer fedmed"}
    path = tmp_path / "cleveland.ledger.jsonl"
    line = _signed(path, newer)
    [entry] = read_entries(path, load_public_key(path.with_suffix(".pub")))
    assert entry.accountant is None and entry.max_grad_norm is None
    assert entry.accountant_name == "prv" and entry.eps_error is None  # Opacus' default
    assert entry.extra == {"clipping": {"kind": "per_layer"}, "zz_note": "from a newer fedmed"}
    assert entry.to_json() + "\n" == line
    audit = verify_ledger(path)
    assert audit.ok, audit.findings
    assert audit.entries[0].max_grad_norm is None and audit.entries[0].accountant == "? ? ?"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"steps": "15"}, "entry field 'steps' is '15', not an integer"),
        ({"epsilon": None}, "entry field 'epsilon' is null, not a number"),
        ({"round": True}, "entry field 'round' is True, not an integer"),
        ({"accountant": "prv"}, "entry field 'accountant' is 'prv', not a JSON object"),
    ],
)
def test_a_signed_line_that_is_no_entry_is_refused_at_its_line(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    old = {k: v for k, v in json.loads(_lines(OLD_LEDGER)[0]).items() if k not in CHAIN}
    path = tmp_path / "cleveland.ledger.jsonl"
    _signed(path, {**old, **change})
    with pytest.raises(LedgerError, match=rf"line 1: {problem}$"):
        read_entries(path, load_public_key(path.with_suffix(".pub")))
    assert [(f.line, f.check, f.message) for f in verify_ledger(path).findings] == [
        (1, "format", problem)
    ]


def test_an_entry_lacking_a_required_field_names_every_missing_one() -> None:
    old = json.loads(_lines(OLD_LEDGER)[0])
    with pytest.raises(RecordError, match=r"^entry lacks run_id, epsilon$"):
        LedgerEntry.from_dict({k: v for k, v in old.items() if k not in ("run_id", "epsilon")})

