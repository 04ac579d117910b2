"""Writing key files: private keys get mode 0600 and are never silently overwritten."""

from __future__ import annotations

import os
from pathlib import Path

from fedmed.errors import FedMedError


def write_private(path: Path, data: bytes, force: bool = False) -> None:
    """Create ``path`` with mode 0600 (``force``: replace an existing file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise FedMedError(f"{path}: already exists; refusing to overwrite a key (use --force)")
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_public(path: Path, data: bytes, force: bool = False) -> None:
    """Create a public file (certificate, public key); refuses to overwrite without ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise FedMedError(f"{path}: already exists; refusing to overwrite (use --force)")
    path.write_bytes(data)
