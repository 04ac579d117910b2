"""What a saved model is: the card written beside ``global_model.pt``.

A state_dict alone does not say which architecture it fits or which input columns its
weights read. ``fedmed explain`` (at the coordinator or at a hospital, possibly on another
machine than the run's) rebuilds the model from the card and refuses a model whose columns
differ from the site's data, naming both, instead of explaining the wrong features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedmed.config.schema import ModelName
from fedmed.data.tabular import InputColumn
from fedmed.data.types import DataSchema
from fedmed.errors import FedMedError
from fedmed.models import build_model

CARD_SUFFIX = ".json"


@dataclass(frozen=True)
class ModelCard:
    """The architecture (``model``, input shape, classes), the dataset's name, the names of
    the input columns (tables; None for images), whether the run was simulated (its
    sites' data are then on the coordinator's machine) and its seed."""

    model: str
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    columns: tuple[InputColumn, ...] | None
    simulated: bool
    seed: int  # the run's seed: a site redraws the same train/test split from it

    @property
    def schema(self) -> DataSchema:
        return DataSchema(self.input_shape, self.num_classes)


def card_path(model_path: Path) -> Path:
    """``global_model.pt`` -> ``global_model.json``."""
    return model_path.with_suffix(CARD_SUFFIX)


def write_card(card: ModelCard, model_path: Path) -> None:
    card_path(model_path).write_text(json.dumps(asdict(card), indent=2) + "\n")


def read_card(model_path: Path) -> ModelCard:
    """The card beside ``model_path``; one error naming the file when it is missing or bad."""
    if not model_path.is_file():
        raise FedMedError(
            f"{model_path}: model file not found (a run folder holds global_model.pt)"
        )
    path = card_path(model_path)
    if not path.is_file():
        raise FedMedError(
            f"{path}: no model card beside {model_path.name} (fedmed writes it with the global "
            "model; copy it together with the model file)"
        )
    try:
        raw = json.loads(path.read_text())
        columns = raw["columns"]
        return ModelCard(
            model=ModelName(raw["model"]).value,
            dataset=str(raw["dataset"]),
            input_shape=tuple(int(v) for v in raw["input_shape"]),
            num_classes=int(raw["num_classes"]),
            columns=None if columns is None else tuple(InputColumn(**c) for c in columns),
            simulated=bool(raw["simulated"]),
            seed=int(raw["seed"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise FedMedError(f"{path}: not a fedmed model card ({err!r})") from None


def load_model(model_path: Path, card: ModelCard) -> nn.Module:
    """The saved weights in the card's architecture; errors name the file."""
    if not model_path.is_file():
        raise FedMedError(f"{model_path}: model file not found")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a state_dict
        raise FedMedError(f"{model_path}: not a saved model ({type(err).__name__})") from None
    model = build_model(ModelName(card.model), card.schema, seed=0)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise FedMedError(
            f"{model_path}: its weights do not fit model={card.model} with input "
            f"{list(card.input_shape)} ({first})"
        ) from None
    return model.eval()
