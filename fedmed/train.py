"""Local training and evaluation loops, shared by hospital sites and by the baselines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config import FedMedConfig
from fedmed.metrics import EvalStats, margin_histogram


@dataclass(frozen=True)
class TrainSettings:
    """Everything a local training pass needs besides the model and the data."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    proximal_mu: float = 0.0

    @classmethod
    def from_config(cls, cfg: FedMedConfig) -> TrainSettings:
        return cls(
            epochs=cfg.federation.local_epochs,
            batch_size=cfg.model.batch_size,
            lr=cfg.model.lr,
            momentum=cfg.model.momentum,
            weight_decay=cfg.model.weight_decay,
            proximal_mu=cfg.strategy.proximal_mu,
        )


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Model parameters and buffers as numpy arrays, in state_dict order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays produced by ``get_weights`` (same architecture) into ``model``."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays for this model, got {len(arrays)}")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )


def make_loader(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool = True
) -> DataLoader:
    """A seeded DataLoader over in-memory arrays."""
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_local(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Run ``settings.epochs`` epochs of SGD; returns the mean training loss of the last epoch.

    With ``proximal_mu > 0`` (FedProx) the loss adds mu/2 * ||w - w_start||^2, anchoring the
    site to the global model it started from.
    """
    model.train()
    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else []
    epoch_loss = 0.0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(yb) == 0:
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if anchor:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * settings.proximal_mu * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        epoch_loss = total / max(count, 1)
    return epoch_loss


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int
) -> EvalStats:
    """Loss sum, correct count and (binary tasks) margin histograms on one site's test split."""
    model.eval()
    if len(y) == 0:
        empty = np.zeros(0)
        hist = margin_histogram(empty) if num_classes == 2 else None
        return EvalStats(0, 0.0, 0, hist, hist)
    logits = model(torch.from_numpy(x))
    labels = torch.from_numpy(y)
    loss_sum = float(loss_fn(logits, labels)) * len(y)
    correct = int((logits.argmax(dim=1) == labels).sum())
    if num_classes != 2:
        return EvalStats(len(y), loss_sum, correct)
    margins = (logits[:, 1] - logits[:, 0]).numpy()
    return EvalStats(
        len(y),
        loss_sum,
        correct,
        hist_pos=margin_histogram(margins[y == 1]),
        hist_neg=margin_histogram(margins[y == 0]),
    )
