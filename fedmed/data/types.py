"""Plain containers for one site's data; nothing here knows about Flower or torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmed.data.tabular import SitePreprocessor


@dataclass(frozen=True)
class DataSchema:
    """What the coordinator needs to build the global model: input shape and class count."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class SiteData:
    """One hospital's train and test split, already preprocessed on that site alone, and the
    validation split carved from its training records when the operating point needs one.
    ``preprocessing``: a CSV site's own preprocessing, which names the model's input columns
    and turns them back into the records' units (explanations read it; nothing sends it)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    preprocessing: SitePreprocessor | None = None

    @property
    def held_out_records(self) -> int:
        """Records training never sees (test and validation): the evaluation release's."""
        return len(self.y_test) + (len(self.y_val) if self.y_val is not None else 0)

    @property
    def schema(self) -> DataSchema:
        return DataSchema(tuple(self.x_train.shape[1:]), self.num_classes)
