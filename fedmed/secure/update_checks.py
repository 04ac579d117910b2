"""Is a model update sound? The one check a site runs before sending and the coordinator on
receipt: the same number of arrays, each of the global model's shape, every value finite."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def update_problem(update: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> str | None:
    """What is wrong with ``update`` against the global arrays ``expected``; None if sound."""
    if len(update) != len(expected):
        return f"{len(update)} arrays, expected {len(expected)} (the global model's layers)"
    for index, (array, reference) in enumerate(zip(update, expected, strict=True)):
        if array.shape != reference.shape:
            return f"array {index} has shape {array.shape}, expected {reference.shape}"
        if not np.issubdtype(array.dtype, np.number):
            return f"array {index} has dtype {array.dtype}, expected numbers"
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"array {index} holds {bad} non-finite value(s) (NaN or infinity)"
    return None
