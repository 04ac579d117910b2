"""Model registry: name -> (module builder, training loss). All models are Opacus-compatible."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmed.config.schema import ModelName
from fedmed.data.types import DataSchema
from fedmed.errors import ConfigError
from fedmed.models.canary import CanaryHead
from fedmed.models.cnn import DiagnosisNet, DPFirstNet
from fedmed.models.linear import LinearClassifier
from fedmed.models.losses import ClassWeightedLoss, build_loss, class_weights
from fedmed.models.scatter import SCALES, ScatterNet


def build_model(name: ModelName, schema: DataSchema, seed: int, canaries: int = 0) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights on every machine.

    ``canaries > 0`` (empirical audit only) adds the audit's canary head. Only the CPU
    generator is seeded, inside a fork of its state: ``torch.manual_seed`` would also queue
    a seeding of every accelerator (recording a stack trace each time, a measurable cost
    when sites rebuild their model for every message) and would reset the caller's RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = _build_base_model(name, schema)
        return CanaryHead(model, canaries, schema.num_classes) if canaries else model


def _build_base_model(name: ModelName, schema: DataSchema) -> nn.Module:
    if name in (ModelName.cnn, ModelName.dpcnn, ModelName.scatter):
        if len(schema.input_shape) != 3 or schema.input_shape[1] != schema.input_shape[2]:
            raise ConfigError(
                "model",
                name.value,
                f"svm or logreg: the data has shape {schema.input_shape}, "
                f"and {name.value} needs square images (C, H, W)",
            )
        channels, size, _ = schema.input_shape
        if name is ModelName.scatter and size % 2**SCALES:
            raise ConfigError(
                "model", name.value, f"cnn: scatter needs images a multiple of {2**SCALES} "
                f"pixels wide, the data's are {size}",
            )
        if name is ModelName.dpcnn:
            return DPFirstNet(channels, schema.num_classes)
        if name is ModelName.scatter:
            return ScatterNet(channels, size, schema.num_classes)
        return DiagnosisNet(channels, size, schema.num_classes)
    return LinearClassifier(math.prod(schema.input_shape), schema.num_classes)


__all__ = [
    "ClassWeightedLoss",
    "DPFirstNet",
    "DiagnosisNet",
    "LinearClassifier",
    "ScatterNet",
    "build_loss",
    "build_model",
    "class_weights",
]
