"""Attribution maps of an image model, with Captum, and the model-randomisation check.

What is explained is the logit margin ``logit[1] - logit[0]`` (what the operating point
thresholds), so a positive attribution pushes the image towards class 1. Integrated
Gradients (Sundararajan et al. 2017) integrates from a black image; its completeness error
(attributions' sum minus the margin's change) says how well its ``steps`` approximate the
integral. Saliency is the gradient's magnitude. Adebayo et al. (2018): a map that barely
changes when the model's weights are re-initialised explains the image, not the model; the
check re-initialises the layers from the top down (cascading) and reports, per stage, the
rank correlation of the maps of the trained and of the randomised model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients, Saliency
from scipy.stats import spearmanr
from torch import nn

IG_STEPS = 64


class Margin(nn.Module):
    """``logit[1] - logit[0]`` of a binary image model, one number per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits[:, 1] - logits[:, 0]


@dataclass(frozen=True)
class Maps:
    """Integrated Gradients and saliency maps (N, C, H, W), and IG's completeness error."""

    integrated_gradients: np.ndarray
    saliency: np.ndarray
    completeness_error: np.ndarray


def margins(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Margin(model.eval())(torch.from_numpy(images)).double().numpy()


def attribution_maps(model: nn.Module, images: np.ndarray, steps: int = IG_STEPS) -> Maps:
    """Both maps for ``images`` (float32 in [0, 1]); the model's weights are not changed."""
    margin = Margin(model.eval())
    inputs = torch.from_numpy(np.ascontiguousarray(images)).requires_grad_(True)
    ig, delta = IntegratedGradients(margin).attribute(
        inputs, baselines=0.0, n_steps=steps, return_convergence_delta=True
    )
    grad = Saliency(margin).attribute(inputs, abs=True)
    return Maps(ig.detach().numpy(), grad.detach().numpy(), np.abs(delta.detach().numpy()))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, Spearman's rank correlation of the two maps' absolute values."""
    flat_a, flat_b = np.abs(a).reshape(len(a), -1), np.abs(b).reshape(len(b), -1)
    return np.array([spearmanr(x, y).statistic for x, y in zip(flat_a, flat_b, strict=True)])


def trained_layers(model: nn.Module) -> list[str]:
    """The model's layers with weights of their own, input to output."""
    return [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]


def randomised(model: nn.Module, layers: list[str], seed: int) -> nn.Module:
    """A copy of ``model`` whose ``layers`` are re-initialised (their own ``reset_parameters``,
    seeded); the other layers keep the trained weights."""
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            reset = getattr(modules[name], "reset_parameters", None)
            if reset is None:
                raise ValueError(f"layer {name} ({type(modules[name]).__name__}) cannot reset")
            reset()
    return copied.eval()


@dataclass(frozen=True)
class RandomisationStage:
    """One stage of the cascading check: the top layers re-initialised so far, and the
    mean (sd) rank correlation of the trained and randomised maps over the images."""

    randomised: list[str]
    integrated_gradients: tuple[float, float]
    saliency: tuple[float, float]


# Not the seed fedmed initialises models with: the check's weights must not be the very
# initial weights a (barely) trained model started from.
RANDOMISATION_SEED = 0x5A17


def randomisation_check(
    model: nn.Module, images: np.ndarray, trained: Maps, seed: int = RANDOMISATION_SEED
) -> list[RandomisationStage]:
    """Re-initialise the layers from the output back to the input, one more each stage."""
    layers = trained_layers(model)
    stages = []
    for count in range(1, len(layers) + 1):
        top = layers[len(layers) - count :]
        maps = attribution_maps(randomised(model, top, seed), images)
        ig = rank_correlation(trained.integrated_gradients, maps.integrated_gradients)
        sal = rank_correlation(trained.saliency, maps.saliency)
        stages.append(
            RandomisationStage(
                list(reversed(top)),
                (float(np.mean(ig)), float(np.std(ig))),
                (float(np.mean(sal)), float(np.std(sal))),
            )
        )
    return stages
