"""Split one data source into disjoint sites (IID or label-skewed Dirichlet) and into train/test."""

from __future__ import annotations

import numpy as np

from fedmed.errors import ConfigError


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, test) index arrays with each class split in the same proportion.

    Every class with at least two records keeps at least one record on each side.
    """
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def iid_partition(num_records: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_sites`` nearly equal, disjoint parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(num_records), num_sites)]


def dirichlet_proportions(
    num_classes: int, num_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw, for every class, how its records are shared among sites: shape (classes, sites)."""
    return rng.dirichlet(np.full(num_sites, alpha), size=num_classes)


def partition_by_proportions(
    labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each site its share of every class; the parts are disjoint and cover all records."""
    num_sites = proportions.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for cls in range(proportions.shape[0]):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(proportions[cls])[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def partition_train_test(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_sites: int,
    method: str,
    alpha: float,
    min_records: int,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Partition the train and the test split the same way (same site label mix for both).

    Dirichlet draws are repeated (deterministically from ``seed``) until every site holds at
    least ``min_records`` training records.
    """
    rng = np.random.default_rng(seed)
    if num_sites * min_records > len(train_labels):
        raise ConfigError(
            "federation.num_sites",
            num_sites,
            f"at most {len(train_labels) // max(min_records, 1)} sites for {len(train_labels)} "
            f"training records and dataset.min_records_per_site={min_records}",
        )
    if method == "iid":
        return (
            iid_partition(len(train_labels), num_sites, rng),
            iid_partition(len(test_labels), num_sites, rng),
        )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    for _ in range(1000):
        proportions = dirichlet_proportions(num_classes, num_sites, alpha, rng)
        train_parts = partition_by_proportions(train_labels, proportions, rng)
        if min(len(p) for p in train_parts) >= min_records:
            return train_parts, partition_by_proportions(test_labels, proportions, rng)
    raise ConfigError(
        "dataset.alpha",
        alpha,
        f"a larger alpha or fewer sites: no Dirichlet draw gave every one of {num_sites} sites "
        f"{min_records} training records (dataset.min_records_per_site)",
    )
