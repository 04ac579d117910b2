"""The coordinator's signed receipts of the ledger entries behind the DP updates it received.

A site records every DP round in its own ledger before the update leaves it, and the update
arrives with that entry's hash (metric ``ledger_entry``; a hash reveals nothing). For every
such update the coordinator appends a receipt to ``receipts.jsonl`` in the run folder: site,
round, the entry's hash and the accounting the site reported. The file has the ledger's own
format (JSON Lines, hash chain, Ed25519 signatures, fsync'ed appends), signed with the
coordinator's key, so ``fedmed audit verify`` checks it with the same reader. The site cannot
reach it: a site ledger that was later truncated, replaced or deleted is missing entries the
coordinator holds receipts for, and the auditor names them.

Key: ``receipts.key`` in the run folder (a simulation), or the deployed coordinator's own
key for all its runs (``fedmed.runs.flower_app``); the public key is always copied beside the
receipts as ``receipts.pub``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmed.privacy.ledger import (
    GENESIS_HASH,
    append_entry,
    load_or_create_signing_key,
    public_key_pem,
    read_verified,
)
from fedmed.protocol import PrivacyReport

RECEIPTS_FILE = "receipts.jsonl"
RECEIPTS_PUBLIC_KEY = "receipts.pub"
RECEIPTS_KEY = "receipts.key"
RECEIPT_FORMAT = "fedmed-receipt/1"
# What the site reported beside the hash; kept so the auditor can compare it with the entry.
REPORTED_KEYS = ("epsilon", "steps", "noise_multiplier", "sample_rate", "delta", "ledger")
log = logging.getLogger(__name__)


def _drop_torn_tail(path: Path) -> None:
    """A coordinator killed mid-append (``resume=true`` after a crash) left half a receipt:
    that update's receipt was never complete, so cut it and go on (a site's ledger, by
    contrast, is never repaired: the site refuses to train on it)."""
    if not path.exists():
        return
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: dropping a receipt cut off by a crash (%d bytes)", path, len(raw) - keep)
        os.truncate(path, keep)


@dataclass
class ReceiptBook:
    """Receipts of one run, appended as updates arrive (created on the first one)."""

    output_dir: Path
    key_path: Path | None = None  # default: receipts.key in the run folder
    _key: Ed25519PrivateKey | None = field(default=None, init=False, repr=False)
    _head: str | None = field(default=None, init=False, repr=False)

    @property
    def path(self) -> Path:
        return self.output_dir / RECEIPTS_FILE

    def _open(self) -> tuple[Ed25519PrivateKey, str]:
        """The coordinator's key and the chain's head (a resumed run continues its file)."""
        if self._key is None or self._head is None:
            key_path = self.key_path or self.output_dir / RECEIPTS_KEY
            key = load_or_create_signing_key(key_path, key_path.with_suffix(".pub"))
            public = self.output_dir / RECEIPTS_PUBLIC_KEY
            if not public.exists():
                self.output_dir.mkdir(parents=True, exist_ok=True)
                public.write_bytes(public_key_pem(key))
            _drop_torn_tail(self.path)
            entries = read_verified(self.path, key.public_key())
            self._key = key
            self._head = entries[-1]["hash"] if entries else GENESIS_HASH
        return self._key, self._head

    def record(self, server_round: int, site: str, privacy: PrivacyReport) -> dict[str, Any]:
        """One receipt for a DP update (``privacy`` as the site reported it); durable on return."""
        key, head = self._open()
        entry = privacy.ledger_entry
        reported = privacy.to_metrics()
        fields = {
            "format": RECEIPT_FORMAT,
            "site": site,
            "round": server_round,
            "ledger_entry": entry[:128] if entry is not None else None,
            "received": datetime.datetime.now(datetime.UTC).isoformat(),
            "reported": {k: reported[k] for k in REPORTED_KEYS if k in reported},
        }
        receipt = append_entry(self.path, fields, key, head)
        self._head = receipt["hash"]
        return receipt
