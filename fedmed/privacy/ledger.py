"""A site's privacy ledger: JSON Lines, hash-chained and Ed25519-signed, fsync'ed on append.

Each entry carries ``prev_hash`` (the previous entry's ``hash``), its own ``hash`` (sha256 of the
canonical JSON of every other field) and ``signature`` (Ed25519 over that hash, with the site's
key). Any edit, deletion, reordering, insertion or truncation breaks the chain or a signature,
and ``read_verified`` names the first line that is wrong (it checks any file of signed JSON
lines: the coordinator's receipts use it too). What a site's line records is a
``LedgerEntry``, the one parser of ledger lines; ``read_entries`` verifies and parses. The schema
only grows: fields are added (optional), never renamed or given a new meaning, and keys from
a newer writer are kept verbatim, so an old ledger keeps verifying and a newer one still does.

A chain cannot show that lines are missing at its end, or that the whole file is gone. So the
site also keeps a signed high-water mark (entry count and head hash) outside the ledger file,
beside its signing key (``<signing key>.mark``: in a deployed kit the key lives in another
folder than the ledger, so wiping or restoring the ledger folder leaves the mark). The mark is
rewritten, durably and atomically, after every entry. Before a site trains, ``open_ledger``
refuses a ledger that is missing, shorter than its mark, or has another entry where the mark's
head should be. The mark may lag the ledger (a crash between the entry's fsync and the mark's):
the ledger then extends the marked chain, its extra entries verify like every other line, and
the mark is rolled forward. A ledger from before marks existed gets one from its verified
content. The mark protects against accidents and against anyone who can reach the ledger but
not the key folder; the coordinator's signed receipts (``fedmed.coordinator.receipts``) cover
the rest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.errors import FedMedError
from fedmed.kits.keys import write_private, write_public
from fedmed.privacy.accounting import DPSteps
from fedmed.privacy.mechanisms import TRAIN
from fedmed.records import UNREAD, RecordError, field_names, read_fields, unknown_keys

GENESIS_HASH = "0" * 64
SIGNED_FIELDS_EXCLUDED = ("hash", "signature")
MARK_SUFFIX = ".mark"
MARK_FORMAT = "fedmed-ledger-mark/1"
MARK_RESTORE = "restore it from the site's backup (it is checked against the ledger)"
log = logging.getLogger(__name__)


class LedgerError(FedMedError):
    """The ledger cannot be trusted (or written); names the file and the first bad line."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"privacy ledger {where}: {problem}")


def canonical_json(fields: Mapping[str, Any]) -> str:
    """The one JSON form of a ledger line: sorted keys, no spaces, no NaN (hashed and written)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of an entry without its ``hash`` and ``signature``."""
    body = {k: v for k, v in fields.items() if k not in SIGNED_FIELDS_EXCLUDED}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD round a site ran, as its ledger line records it; every reader takes it here.

    The schema only grows: a new field is optional, and its absence keeps the meaning it had
    before the field existed; no field is renamed or given a new meaning (a writer that
    changed what the fields mean would name a new ``mechanism``, which the auditor refuses to
    recompute). An entry holds exactly its line: an optional field the line lacks stays None
    and ``as_dict`` leaves it out again; keys this version does not know (a newer writer's)
    are kept verbatim in ``extra``, used by no check, and written back, so ``to_json`` is the
    signed line byte for byte and its hash and signature still verify.
    """

    site: str
    run_id: str
    round: int
    mechanism: str
    dataset_size: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    epsilon: float  # lifetime epsilon of the entry's split after this release, at ``delta``
    budget_epsilon: float
    # Optional: written by every fedmed so far, but not needed to recompute epsilon.
    timestamp: str | None = None
    max_grad_norm: float | None = None
    accountant: dict[str, Any] | None = None  # name, library, version[, eps_error]
    config_hash: str | None = None
    code_version: str | None = None
    # Since evaluations are released privately; absent: a DP-SGD round on the training split.
    split: str | None = None  # the records the mechanism touched: "train" or "evaluation"
    sensitivity: float | None = None  # L2 sensitivity of the release (DP-SGD: max_grad_norm)
    record_epsilon: float | None = None  # one record of the site: the worse split's epsilon
    released: str | None = None  # what an evaluation released (the counts, in words)
    # The chain: set once the entry is appended (None on an entry not yet signed).
    prev_hash: str | None = None
    hash: str | None = None
    signature: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata=UNREAD)  # a newer writer's

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LedgerEntry:
        """The entry a line's JSON object records; RecordError names a missing or bad field."""
        return cls(**read_fields(cls, raw, "entry"), extra=unknown_keys(raw, field_names(cls)))

    @classmethod
    def from_json(cls, line: str) -> LedgerEntry:
        """The entry of one ledger line (not verified: ``read_entries`` checks the chain)."""
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            raise RecordError("entry is not valid JSON") from None
        if not isinstance(raw, dict):
            raise RecordError("entry is not a JSON object")
        return cls.from_dict(raw)

    def as_dict(self) -> dict[str, Any]:
        """The line's JSON object: the fields it had, and the keys kept in ``extra``."""
        known = {name: getattr(self, name) for name in field_names(LedgerEntry)}
        return {**self.extra, **{k: v for k, v in known.items() if v is not None}}

    def to_json(self) -> str:
        """The ledger line (without its line end), exactly as the site wrote it."""
        return canonical_json(self.as_dict())

    @property
    def dp_steps(self) -> DPSteps:
        """The mechanism this entry records, as the accountants compose it."""
        return DPSteps(float(self.noise_multiplier), float(self.sample_rate), self.steps)

    @property
    def split_name(self) -> str:
        """The split whose records the entry's mechanism touched (older entries: training)."""
        return self.split or TRAIN

    @property
    def accountant_name(self) -> str:
        """The accountant that computed ``epsilon``; without a record, Opacus' PRV (what
        fedmed used before it recorded the accountant)."""
        return str((self.accountant or {}).get("name", "prv"))

    @property
    def eps_error(self) -> Any:
        """The error bound the accountant states for ``epsilon``; None when it states none."""
        return (self.accountant or {}).get("eps_error")


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(path, None, "public key is not an Ed25519 key")
    return key


def load_or_create_signing_key(key_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 signing key (created with mode 0600 on first use); public key beside."""
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(key_path, None, "signing key is not an Ed25519 private key")
    else:
        key = Ed25519PrivateKey.generate()
        write_private(key_path, signing_key_pem(key))
    if not public_path.exists():
        write_public(public_path, public_key_pem(key))
    return key


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The private key as unencrypted PKCS8 PEM (the file itself is mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The public key auditors verify the ledger with."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def read_verified(path: Path, public_key: Ed25519PublicKey) -> list[dict[str, Any]]:
    """All entries, after checking every line's JSON, chain link, hash and signature."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        last = raw.count(b"\n") + 1
        raise LedgerError(path, last, "truncated entry (no line end): the last write was cut off")
    entries: list[dict[str, Any]] = []
    previous = GENESIS_HASH
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        entry = _verified_line(path, number, line, previous, public_key)
        entries.append(entry)
        previous = entry["hash"]
    return entries


def parse_entries(path: Path, lines: Sequence[Mapping[str, Any]]) -> list[LedgerEntry]:
    """The typed entries of verified ledger lines; LedgerError at the first that is not one
    (a site cannot count what it cannot read, so it then refuses to train)."""
    entries = []
    for number, fields in enumerate(lines, start=1):
        try:
            entries.append(LedgerEntry.from_dict(fields))
        except RecordError as err:
            raise LedgerError(path, number, str(err)) from None
    return entries


def read_entries(path: Path, public_key: Ed25519PublicKey) -> list[LedgerEntry]:
    """A site's ledger, verified (``read_verified``) and read as entries."""
    return parse_entries(path, read_verified(path, public_key))


def _roll_back(path: Path, size: int) -> None:
    """Cut a half-written line (disk full, file size limit): the ledger stays verifiable."""
    try:
        if path.exists() and path.stat().st_size > size:
            os.truncate(path, size)
    except OSError:
        pass  # the next read names the truncated line; the site then refuses to train


def ensure_writable(path: Path) -> None:
    """Fail before training, not after, when the ledger cannot be written at all.

    Checks without creating the ledger: a site that then declines for another reason leaves
    no empty ledger behind.
    """
    try:
        if path.exists():
            with path.open("a", encoding="utf-8"):
                pass
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as exc:
        raise LedgerError(
            path, None, f"cannot be written ({exc.strerror}); the site will not train unrecorded"
        ) from None


def _verified_line(
    path: Path, number: int, line: str, previous: str, public_key: Ed25519PublicKey
) -> dict[str, Any]:
    """One line's entry after its JSON, chain link, hash and signature are checked."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        raise LedgerError(path, number, "not valid JSON (edited or truncated)") from None
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("hash"), str)
        and isinstance(entry.get("signature"), str)
    ):
        raise LedgerError(path, number, "entry lacks its hash or signature")
    if entry.get("prev_hash") != previous:
        raise LedgerError(
            path, number, "broken hash chain (an entry was deleted, inserted or reordered)"
        )
    try:
        recomputed = entry_hash(entry)
    except ValueError:  # NaN or infinity: never written by append_entry
        recomputed = None
    if recomputed != entry["hash"]:
        raise LedgerError(path, number, "content does not match its hash (entry edited)")
    try:
        public_key.verify(bytes.fromhex(entry["signature"]), entry["hash"].encode("ascii"))
    except (InvalidSignature, ValueError):
        raise LedgerError(path, number, "bad signature (not signed by this site's key)") from None
    return entry


def append_entry(
    path: Path, fields: dict[str, Any], key: Ed25519PrivateKey, prev_hash: str
) -> dict[str, Any]:
    """Chain, hash, sign and durably append one entry; returns the entry as written.

    The line is flushed and fsync'ed (and the folder too, when the file is new) before this
    returns, so the entry survives a crash that happens after it.
    """
    entry = {**fields, "prev_hash": prev_hash}
    entry["hash"] = entry_hash(entry)
    entry["signature"] = key.sign(entry["hash"].encode("ascii")).hex()
    line = canonical_json(entry) + "\n"
    is_new = not path.exists()
    size_before = 0 if is_new else path.stat().st_size
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if is_new:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        _roll_back(path, size_before)
        raise LedgerError(path, None, f"cannot write the entry ({exc.strerror})") from None
    return entry


# ---------------------------------------------------------------------- high-water mark
def mark_path(signing_key: Path) -> Path:
    """Where a site keeps its ledger's high-water mark: beside its signing key."""
    return signing_key.with_suffix(MARK_SUFFIX)


@dataclass(frozen=True)
class HighWaterMark:
    """How far the site's ledger reached when the site last wrote it (signed by the site)."""

    site: str
    ledger: str  # the ledger file the mark was written for (informational)
    entries: int
    head: str  # hash of entry number ``entries`` (GENESIS_HASH for none)
    timestamp: str


def _mark_body(mark: HighWaterMark) -> bytes:
    body = {"format": MARK_FORMAT, **asdict(mark)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_mark(path: Path, key: Ed25519PrivateKey, mark: HighWaterMark) -> None:
    """Durably replace the mark: written to a temporary file, fsync'ed, renamed, folder fsync'ed.

    A crash leaves either the old mark or the new one, never half of one.
    """
    body = _mark_body(mark)
    signed = {**json.loads(body), "signature": key.sign(body).hex()}
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(signed, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise LedgerError(
            path, None, f"cannot write the ledger's high-water mark ({exc.strerror})"
        ) from None


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_mark(path: Path, public_key: Ed25519PublicKey) -> HighWaterMark | None:
    """The verified mark, or None when there is none; LedgerError when it is not the site's."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mark = HighWaterMark(
            site=str(data["site"]),
            ledger=str(data["ledger"]),
            entries=int(data["entries"]),
            head=str(data["head"]),
            timestamp=str(data["timestamp"]),
        )
        signature = bytes.fromhex(data["signature"])
        valid_format = data.get("format") == MARK_FORMAT and mark.entries >= 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LedgerError(
            path, None, f"high-water mark is unreadable (damaged); {MARK_RESTORE}"
        ) from None
    try:
        public_key.verify(signature, _mark_body(mark))
    except InvalidSignature:
        valid_format = False
    if not valid_format:
        raise LedgerError(
            path, None, f"high-water mark is not signed by this site's key (edited); {MARK_RESTORE}"
        )
    return mark


def mark_problem(
    ledger: Path, mark: HighWaterMark, entries: list[dict[str, Any]], mark_file: Path | None = None
) -> str | None:
    """What is wrong with a verified ledger against its mark; None when it holds the mark.

    The rule: entry number ``mark.entries`` exists and has hash ``mark.head``. Entries after it
    are allowed (the mark lags after a crash between the entry and the mark); they verified
    with the rest of the chain.
    """
    head = f"{mark.head[:16]}..."
    where = f" ({mark_file})" if mark_file is not None else ""
    restore = (
        f"restore the ledger from the site's backup (a copy whose entry {mark.entries} has "
        f"hash {head}); nothing trains until then"
    )
    if not entries and mark.entries > 0:
        state = "is missing" if not ledger.exists() else "is empty"
        return (
            f"{state}, but the site's high-water mark{where} records {mark.entries} entries: "
            f"it was deleted or replaced; {restore} (a site never starts a new ledger over "
            "its recorded spend)"
        )
    if len(entries) < mark.entries:
        return (
            f"holds {len(entries)} entries, but the site's high-water mark{where} records "
            f"{mark.entries}: the last {mark.entries - len(entries)} were cut off, or an older "
            f"copy was put back; {restore}"
        )
    found = entries[mark.entries - 1]["hash"] if mark.entries else GENESIS_HASH
    if found != mark.head:
        return (
            f"entry {mark.entries} has hash {found[:16]}..., but the site's high-water "
            f"mark{where} records {head}: this is not the ledger the site wrote; {restore}"
        )
    return None


def _mark_of(site: str, ledger: Path, entries: list[dict[str, Any]]) -> HighWaterMark:
    return HighWaterMark(
        site=site,
        ledger=str(ledger),
        entries=len(entries),
        head=entries[-1]["hash"] if entries else GENESIS_HASH,
        timestamp=datetime.datetime.now(datetime.UTC).isoformat(),
    )


def open_ledger(
    ledger: Path, mark_file: Path, key: Ed25519PrivateKey, site: str
) -> list[dict[str, Any]]:
    """The site's verified entries, after checking the ledger against its high-water mark.

    Refuses (LedgerError, with how to restore) a missing, shorter or replaced ledger. Rolls
    a lagging mark forward, and creates the mark of a ledger written before marks existed.
    """
    public_key = key.public_key()
    entries = read_verified(ledger, public_key)
    mark = read_mark(mark_file, public_key)
    if mark is None:
        if entries:
            log.warning(
                "privacy ledger %s: no high-water mark yet (written before fedmed kept one); "
                "creating %s from its %d verified entries",
                ledger,
                mark_file,
                len(entries),
            )
            write_mark(mark_file, key, _mark_of(site, ledger, entries))
        return entries
    problem = mark_problem(ledger, mark, entries, mark_file)
    if problem is not None:
        raise LedgerError(ledger, None, problem)
    if len(entries) > mark.entries:
        log.warning(
            "privacy ledger %s: %d verified entr%s after the high-water mark (%s was not "
            "updated, e.g. a crash right after an entry); rolling the mark forward",
            ledger,
            len(entries) - mark.entries,
            "y" if len(entries) - mark.entries == 1 else "ies",
            mark_file,
        )
        write_mark(mark_file, key, _mark_of(site, ledger, entries))
    return entries


def append_marked(
    ledger: Path,
    mark_file: Path,
    fields: dict[str, Any],
    key: Ed25519PrivateKey,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """Append one entry after ``entries`` (the ledger as verified), then move the mark to it.

    The entry is durable before the mark is written; a crash between the two leaves a mark
    one entry behind, which ``open_ledger`` accepts and rolls forward.
    """
    prev = entries[-1]["hash"] if entries else GENESIS_HASH
    entry = append_entry(ledger, fields, key, prev)
    write_mark(mark_file, key, _mark_of(str(fields.get("site", "")), ledger, [*entries, entry]))
    return entry
