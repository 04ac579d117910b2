"""The imbalanced PneumoniaMNIST cohort (benchmarks/imbalanced_cohort.py) is a seeded subset of
the bundled real images at the requested class ratios: nothing is created or altered."""

from __future__ import annotations

from collections import Counter
from importlib.resources import files
from pathlib import Path

import numpy as np

from fedmed.data.images import load_medmnist
from tests.e2e import derive_cohort as _derive

BUNDLED = files("fedmed.data.bundled") / "pneumoniamnist" / "pneumoniamnist_subset.npz"


def _pairs(images: np.ndarray, labels: np.ndarray) -> Counter[tuple[bytes, int]]:
    return Counter((i.tobytes(), int(y)) for i, y in zip(images, labels, strict=True))


def test_the_cohort_is_a_seeded_subset_of_the_bundled_images_at_the_ratios(tmp_path: Path):
    out = tmp_path / "cohort.npz"
    printed = _derive(out)
    assert "train: 1206 pneumonia, 134 normal" in printed
    assert " test: 230 pneumonia, 138 normal" in printed  # 5 : 3
    cohort = load_medmnist(out, None, 1)  # what dataset=medmnist reads
    assert np.bincount(cohort.y_train).tolist() == [134, 1206]
    with BUNDLED.open("rb") as handle, np.load(handle) as bundled, np.load(out) as derived:
        for split in ("train", "val", "test"):
            images, labels = bundled[f"{split}_images"], bundled[f"{split}_labels"][:, 0]
            chosen, chosen_labels = derived[f"{split}_images"], derived[f"{split}_labels"][:, 0]
            originals, drawn = _pairs(images, labels), _pairs(chosen, chosen_labels)
            assert drawn <= originals  # drawn without replacement (the subset has 4 repeats)
    again = tmp_path / "again.npz"
    _derive(again)
    other = tmp_path / "other.npz"
    _derive(other, "--seed", "1", "--train-ratio", "3:1")
    with np.load(out) as a, np.load(again) as b, np.load(other) as c:
        assert np.array_equal(a["train_images"], b["train_images"])  # seeded
        assert np.bincount(c["train_labels"][:, 0]).tolist() == [404, 1212]


def test_the_tuning_cohort_never_holds_a_bundled_test_image(tmp_path: Path):
    """Recipes are tuned on the tuning cohort: its test split comes from the bundled
    validation images, so no bundled test image (the final figures') is ever looked at."""
    tuning, final = tmp_path / "tuning.npz", tmp_path / "final.npz"
    printed = _derive(tuning, "--tuning")
    assert " test: 135 pneumonia, 81 normal" in printed  # 5 : 3 of the 135 / 135 val images
    _derive(final)
    with BUNDLED.open("rb") as handle, np.load(handle) as bundled, np.load(tuning) as t:
        val = _pairs(bundled["val_images"], bundled["val_labels"][:, 0])
        test = _pairs(bundled["test_images"], bundled["test_labels"][:, 0])
        drawn = _pairs(t["test_images"], t["test_labels"][:, 0])
        assert drawn <= val and not set(drawn) & set(test)
        assert len(t["val_labels"]) == 0
        with np.load(final) as f:
            assert np.array_equal(t["train_images"], f["train_images"])  # same training cohort
