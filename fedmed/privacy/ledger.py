"""A site's privacy ledger: JSON Lines, hash-chained and Ed25519-signed, fsync'ed on append.

Each entry carries ``prev_hash`` (the previous entry's ``hash``), its own ``hash`` (sha256 of the
canonical JSON of every other field) and ``signature`` (Ed25519 over that hash, with the site's
key). Any edit, deletion, reordering, insertion or truncation breaks the chain or a signature,
and ``read_verified`` names the first line that is wrong. The schema only grows: fields are
added, never renamed or given a new meaning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.errors import FedMedError
from fedmed.keyfiles import write_private, write_public

GENESIS_HASH = "0" * 64
SIGNED_FIELDS_EXCLUDED = ("hash", "signature")


class LedgerError(FedMedError):
    """The ledger cannot be trusted (or written); names the file and the first bad line."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"privacy ledger {where}: {problem}")


def entry_hash(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an entry without its ``hash`` and ``signature``."""
    body = {k: v for k, v in fields.items() if k not in SIGNED_FIELDS_EXCLUDED}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
    line = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
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
