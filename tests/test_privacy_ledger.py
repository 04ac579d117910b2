"""The signed, hash-chained ledger: durable appends, and every kind of tampering is caught."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmed.configure import compose_config
from fedmed.errors import SiteError
from fedmed.privacy.ledger import (
    GENESIS_HASH,
    LedgerError,
    append_entry,
    load_or_create_signing_key,
    load_public_key,
    read_verified,
)
from fedmed.site import HospitalSite, SiteRuntime


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
