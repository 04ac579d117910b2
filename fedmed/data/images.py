"""Read and check a MedMNIST-layout ``.npz`` (1 or 3 channels, binary or multi-class)."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSplits:
    """Images as float32 (N, C, H, W) in [0, 1] and labels as int64 class indices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _images(source: str, key: str, array: np.ndarray, channels: int | None) -> np.ndarray:
    if array.ndim == 3:
        array = array[:, :, :, None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise DataError(
            source,
            f"'{key}' has shape {array.shape}; expected (N, H, W) or (N, H, W, C) with C in "
            "(1, 3) and N, H, W > 0",
        )
    if channels is not None and array.shape[-1] != channels:
        raise DataError(
            source,
            f"'{key}' has {array.shape[-1]} channels but dataset.channels={channels}",
        )
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise DataError(source, f"'{key}' is floating point but not finite values in [0, 1]")
        scaled = array.astype(np.float32)
    else:
        raise DataError(
            source, f"'{key}' has dtype {array.dtype}; expected uint8 or float in [0, 1]"
        )
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def _labels(source: str, key: str, array: np.ndarray, count: int) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.shape[0] != count:
        raise DataError(
            source,
            f"'{key}' has shape {array.shape}; expected ({count},) or ({count}, 1), "
            "one label per image (multi-label sets are not supported)",
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(source, f"'{key}' has dtype {array.dtype}; expected integer class labels")
    return array.astype(np.int64)


def load_medmnist(path: Path, num_classes: int | None, channels: int | None) -> ImageSplits:
    """Load train and test splits; ``num_classes`` defaults to the largest train label + 1."""
    source = str(path)
    if not path.is_file():
        raise DataError(source, "file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                source, "is a single .npy array; expected a MedMNIST-layout .npz archive"
            )
        with loaded as archive:
            missing = [
                f"{s}_{k}"
                for s in SPLITS
                for k in ("images", "labels")
                if f"{s}_{k}" not in archive
            ]
            if missing:
                raise DataError(source, f"missing keys {missing}; found {sorted(archive.files)}")
            arrays = {key: archive[key] for key in archive.files if key.split("_")[0] in SPLITS}
    except (
        zipfile.BadZipFile,
        ValueError,
        OSError,
        EOFError,
        NotImplementedError,
        zlib.error,
    ) as exc:
        # NotImplementedError: a zip feature Python lacks; zlib.error: corrupt compressed data
        raise DataError(source, f"not a readable .npz archive ({exc})") from None

    x_train = _images(source, "train_images", arrays["train_images"], channels)
    x_test = _images(source, "test_images", arrays["test_images"], channels)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            source, f"train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ"
        )
    y_train = _labels(source, "train_labels", arrays["train_labels"], len(x_train))
    y_test = _labels(source, "test_labels", arrays["test_labels"], len(x_test))
    classes = num_classes if num_classes is not None else int(y_train.max()) + 1
    for key, labels in (("train_labels", y_train), ("test_labels", y_test)):
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.size:
            raise DataError(
                source,
                f"'{key}' holds labels {sorted(set(bad.tolist()))[:5]} outside 0..{classes - 1} "
                "(dataset.num_classes)",
            )
    if classes < 2:
        raise DataError(source, "'train_labels' holds a single class; need at least two")
    return ImageSplits(x_train, y_train, x_test, y_test, classes)
