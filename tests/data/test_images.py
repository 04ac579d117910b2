"""MedMNIST-layout images: bundled PneumoniaMNIST subset, 3-channel multi-class files, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.config.schema import ModelName
from fedmed.data import data_schema, load_site
from fedmed.data.images import load_medmnist
from fedmed.errors import DataError
from fedmed.models import build_model


def write_npz(
    path: Path,
    n_train: int = 80,
    n_test: int = 40,
    channels: int = 3,
    classes: int = 5,
    seed: int = 0,
    **replace: np.ndarray,
) -> Path:
    """An official-MedMNIST-layout archive: uint8 (N, 28, 28[, 3]) images, (N, 1) labels."""
    rng = np.random.default_rng(seed)
    shape = (28, 28, 3) if channels == 3 else (28, 28)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        "val_images": rng.integers(0, 256, size=(8, *shape), dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % classes).astype(np.uint8)[:, None],
        "val_labels": (np.arange(8) % classes).astype(np.uint8)[:, None],
        "test_labels": (np.arange(n_test) % classes).astype(np.uint8)[:, None],
    }
    arrays.update(replace)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


# ----------------------------------------------------------------------------- good files
def test_bundled_pneumonia_sites(compose):
    cfg = compose("dataset=pneumonia")
    sites = [load_site(cfg, i) for i in range(4)]
    for site in sites:
        for x in (site.x_train, site.x_test):
            assert x.ndim == 4 and x.shape[1:] == (1, 28, 28)
            assert x.dtype == np.float32
            assert x.min() >= 0.0 and x.max() <= 1.0
        assert site.x_train.shape[0] == len(site.y_train) > 0
        assert site.x_test.shape[0] == len(site.y_test) > 0
        assert site.num_classes == 2
        assert set(np.unique(site.y_train)) == {0, 1}
    assert data_schema(cfg).input_shape == (1, 28, 28)
    # IID sites are disjoint halves of the same pool: equal sizes up to one record
    sizes = [len(s.y_train) for s in sites]
    assert max(sizes) - min(sizes) <= 1
    # images are really scaled from uint8, not all zeros
    assert sites[0].x_train.max() > 0.5


def test_three_channel_five_class_npz(compose, tmp_path):
    path = write_npz(tmp_path / "derma_like.npz")
    cfg = compose("dataset=medmnist", f"dataset.path='{path}'", "model=cnn")
    schema = data_schema(cfg)
    assert schema.input_shape == (3, 28, 28)
    assert schema.num_classes == 5
    site = load_site(cfg, 0)
    assert site.x_train.shape[1:] == (3, 28, 28)
    assert site.num_classes == 5
    assert site.x_train.dtype == np.float32
    # channel-last uint8 is moved to channel-first and scaled by 1/255
    raw = np.load(path)["train_images"]
    total = sum(len(load_site(cfg, i).y_train) for i in range(4))
    assert total == len(raw)
    np.testing.assert_allclose(
        np.sort(np.concatenate([load_site(cfg, i).x_train[:, 2, 3, 4] for i in range(4)])),
        np.sort(raw[:, 3, 4, 2] / 255.0),
        rtol=1e-6,
    )
    model = build_model(ModelName.cnn, site.schema, 0)
    logits = model(torch.from_numpy(site.x_train[:6]))
    assert logits.shape == (6, 5)


def test_float_images_in_unit_range_accepted(tmp_path):
    rng = np.random.default_rng(1)
    path = write_npz(
        tmp_path / "float.npz",
        channels=1,
        classes=2,
        train_images=rng.random((80, 28, 28)).astype(np.float32),
        test_images=rng.random((40, 28, 28)).astype(np.float64),
    )
    splits = load_medmnist(path, None, 1)
    assert splits.x_train.shape == (80, 1, 28, 28)
    assert splits.x_test.dtype == np.float32
    assert splits.num_classes == 2


# ----------------------------------------------------------------------------- bad files
def npz_error(path: Path, num_classes: int | None = None, channels: int | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_medmnist(path, num_classes, channels)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in npz_error(tmp_path / "absent.npz")


def test_missing_keys(tmp_path):
    path = write_npz(tmp_path / "nolabels.npz", test_labels=None)
    message = npz_error(path)
    assert "test_labels" in message and "missing" in message


def test_wrong_image_shape(tmp_path):
    path = write_npz(tmp_path / "flat.npz", train_images=np.zeros((80, 28), dtype=np.uint8))
    message = npz_error(path)
    assert "train_images" in message and "(80, 28)" in message


def test_label_count_mismatch(tmp_path):
    path = write_npz(tmp_path / "count.npz", train_labels=np.zeros((79, 1), dtype=np.uint8))
    message = npz_error(path)
    assert "train_labels" in message and "79" in message


def test_labels_out_of_range_with_num_classes(tmp_path):
    path = write_npz(tmp_path / "range.npz", classes=5)
    message = npz_error(path, num_classes=3)
    assert "dataset.num_classes" in message
    assert "3" in message and "4" in message  # the offending labels


def test_test_labels_beyond_train_labels(tmp_path):
    path = write_npz(
        tmp_path / "testonly.npz",
        classes=2,
        test_labels=np.full((40, 1), 7, dtype=np.uint8),
    )
    assert "test_labels" in npz_error(path)


def test_three_channels_when_one_expected(tmp_path):
    path = write_npz(tmp_path / "rgb.npz", channels=3)
    message = npz_error(path, channels=1)
    assert "3 channels" in message and "dataset.channels=1" in message


def test_float_images_outside_unit_range(tmp_path):
    path = write_npz(
        tmp_path / "float255.npz",
        train_images=np.full((80, 28, 28, 3), 255.0, dtype=np.float32),
    )
    assert "[0, 1]" in npz_error(path)


def test_non_integer_labels(tmp_path):
    path = write_npz(tmp_path / "floatlabels.npz", train_labels=np.zeros((80, 1), dtype=np.float32))
    assert "integer" in npz_error(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("this is not a zip archive\n")
    assert "not a readable .npz" in npz_error(path)


def test_truncated_zip(tmp_path):
    good = write_npz(tmp_path / "good.npz")
    path = tmp_path / "truncated.npz"
    path.write_bytes(good.read_bytes()[:200])
    npz_error(path)


def test_plain_npy_file(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((4, 28, 28), dtype=np.uint8))
    npz_error(path)


def test_bad_file_via_load_site(compose, tmp_path):
    path = write_npz(tmp_path / "rgb.npz", channels=3)
    cfg = compose("dataset=pneumonia", f"dataset.path='{path}'")  # pneumonia sets channels: 1
    with pytest.raises(DataError) as info:
        load_site(cfg, 0)
    assert str(path) in str(info.value)
    assert "channels" in str(info.value)
