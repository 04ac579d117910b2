"""Plain containers for one site's data; nothing here knows about Flower or torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataSchema:
    """What the coordinator needs to build the global model: input shape and class count."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class SiteData:
    """One hospital's train and test split, already preprocessed on that site alone."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def schema(self) -> DataSchema:
        return DataSchema(tuple(self.x_train.shape[1:]), self.num_classes)
