"""Property tests: site partitions and train/test splits are disjoint and cover every record."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed.data.partition import iid_partition, partition_train_test, stratified_split
from fedmed.errors import ConfigError

PROPERTY = settings(max_examples=60, deadline=None)

labels_arrays = st.lists(st.integers(0, 4), min_size=1, max_size=300).map(
    lambda v: np.array(v, dtype=np.int64)
)
seeds = st.integers(0, 2**32 - 1)
alphas = st.floats(0.05, 100.0)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index in 0..n-1 appears in exactly one part (disjoint and covering)."""
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert np.issubdtype(part.dtype, np.integer)


@PROPERTY
@given(n=st.integers(0, 500), sites=st.integers(1, 20), seed=seeds)
def test_iid_partition_exact_cover_and_balanced(n, sites, seed):
    parts = iid_partition(n, sites, np.random.default_rng(seed))
    assert len(parts) == sites
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@PROPERTY
@given(
    train=labels_arrays,
    test=labels_arrays,
    sites=st.integers(1, 8),
    method=st.sampled_from(["iid", "dirichlet"]),
    alpha=alphas,
    seed=seeds,
)
def test_partition_train_test_exact_cover(train, test, sites, method, alpha, seed):
    train_parts, test_parts = partition_train_test(train, test, sites, method, alpha, 0, seed)
    assert len(train_parts) == len(test_parts) == sites
    assert_exact_cover(train_parts, len(train))
    assert_exact_cover(test_parts, len(test))


@PROPERTY
@given(
    train=st.lists(st.integers(0, 3), min_size=40, max_size=300).map(np.array),
    sites=st.integers(1, 5),
    min_records=st.integers(1, 8),
    alpha=st.floats(0.3, 50.0),
    seed=seeds,
)
def test_dirichlet_respects_min_records_or_refuses(train, sites, min_records, alpha, seed):
    try:
        parts, _ = partition_train_test(train, train, sites, "dirichlet", alpha, min_records, seed)
    except ConfigError as err:
        assert err.key in ("dataset.alpha", "federation.num_sites")
        return
    assert min(len(p) for p in parts) >= min_records
    assert_exact_cover(parts, len(train))


@PROPERTY
@given(train=labels_arrays, test=labels_arrays, sites=st.integers(1, 6), alpha=alphas, seed=seeds)
def test_dirichlet_same_seed_same_partition(train, test, sites, alpha, seed):
    a = partition_train_test(train, test, sites, "dirichlet", alpha, 0, seed)
    b = partition_train_test(train, test, sites, "dirichlet", alpha, 0, seed)
    for left, right in zip(a[0] + a[1], b[0] + b[1], strict=True):
        np.testing.assert_array_equal(left, right)


def test_dirichlet_different_seed_different_partition():
    labels = np.arange(400) % 2
    a, _ = partition_train_test(labels, labels, 4, "dirichlet", 0.5, 1, seed=0)
    b, _ = partition_train_test(labels, labels, 4, "dirichlet", 0.5, 1, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_small_alpha_skews_labels_large_alpha_does_not():
    labels = np.arange(4000) % 2

    def spread(alpha: float) -> float:
        parts, _ = partition_train_test(labels, labels, 4, "dirichlet", alpha, 1, seed=3)
        shares = [labels[p].mean() for p in parts]
        return max(shares) - min(shares)

    assert spread(0.1) > 0.5
    assert spread(1000.0) < 0.1


def test_train_and_test_parts_share_label_mix():
    labels = np.arange(2000) % 2
    train_parts, test_parts = partition_train_test(labels, labels, 3, "dirichlet", 0.5, 1, seed=5)
    for tr, te in zip(train_parts, test_parts, strict=True):
        assert labels[tr].mean() == pytest.approx(labels[te].mean(), abs=0.02)


@PROPERTY
@given(labels=labels_arrays, fraction=st.floats(0.05, 0.95), seed=seeds)
def test_stratified_split_exact_cover_and_keeps_classes(labels, fraction, seed):
    train, test = stratified_split(labels, fraction, np.random.default_rng(seed))
    assert_exact_cover([train, test], len(labels))
    for cls, count in zip(*np.unique(labels, return_counts=True), strict=True):
        if count >= 2:
            assert (labels[test] == cls).sum() >= 1
            assert (labels[train] == cls).sum() >= 1
        expected = count * fraction
        assert abs((labels[test] == cls).sum() - expected) <= 1  # same proportion per class


def test_refuses_more_sites_than_records_allow():
    labels = np.zeros(20, dtype=np.int64)
    with pytest.raises(ConfigError) as info:
        partition_train_test(labels, labels, 3, "iid", 0.5, min_records=8, seed=0)
    assert info.value.key == "federation.num_sites"
    assert "20" in str(info.value)


def test_refuses_impossible_dirichlet_draw():
    labels = np.arange(100) % 5
    with pytest.raises(ConfigError) as info:
        partition_train_test(labels, labels, 10, "dirichlet", 0.01, min_records=10, seed=0)
    assert info.value.key == "dataset.alpha"
