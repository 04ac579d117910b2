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

from fedmed.configure import compose_config
from fedmed.errors import SiteError
from fedmed.privacy.ledger import (
    GENESIS_HASH,
    LedgerError,
    append_entry,
    append_marked,
    load_or_create_signing_key,
    load_public_key,
    mark_path,
    open_ledger,
    read_mark,
    read_verified,
    write_mark,
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
    with caplog.at_level("WARNING", logger="fedmed.ledger"):
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
    with caplog.at_level("WARNING", logger="fedmed.ledger"):
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
