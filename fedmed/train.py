"""Local training and evaluation loops, shared by hospital sites and by the baselines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config.schema import FedMedConfig
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

    def sgd(self, model: nn.Module) -> torch.optim.SGD:
        """The optimizer of every local training: plain, and DP-SGD (Opacus wraps this one)."""
        return torch.optim.SGD(
            model.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


def round_seed(seed: int, server_round: int) -> int:
    """The batch-shuffling seed of one round's plain local training, from the run's seed: a
    federated site and the baselines draw the same batch order in the same round."""
    return seed * 100_003 + server_round


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


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss of the last epoch and the optimizer steps taken."""

    loss: float
    steps: int


def train_local(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    private: bool = False,
    anchor: list[torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``settings.epochs`` epochs of SGD over ``loader``.

    With ``proximal_mu > 0`` the model is pulled towards ``anchor`` (one tensor per
    parameter; default: the weights it started from, FedProx) by mu/2 * ||w - anchor||^2;
    MR-MTL starts from the site's own model and anchors it to the global one. Non-private
    training adds it to the loss; with DP-SGD
    (``private=True``) it is applied as a separate data-independent step after each noisy
    update, because Opacus clips only per-sample gradients. DP-SGD also steps on the empty
    batches Poisson sampling produces: each one adds noise and is a step of the mechanism.
    """
    model.train()
    if optimizer is None:
        optimizer = settings.sgd(model)
    if settings.proximal_mu <= 0:
        anchor = []
    elif anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    epoch_loss, steps = 0.0, 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(yb) == 0 and not private:
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if anchor and not private:
                loss = loss + 0.5 * settings.proximal_mu * _squared_distance(model, anchor)
            loss.backward()
            optimizer.step()
            steps += 1
            if anchor and private:
                _proximal_step(model, anchor, settings.lr * settings.proximal_mu)
            if len(yb):
                total += float(loss.detach()) * len(yb)
                count += len(yb)
        epoch_loss = total / max(count, 1)
    return TrainResult(epoch_loss, steps)


def _squared_distance(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum(  # type: ignore[return-value]
        ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
    )


@torch.no_grad()
def _proximal_step(model: nn.Module, anchor: list[torch.Tensor], rate: float) -> None:
    for p, a in zip(model.parameters(), anchor, strict=True):
        p.sub_(rate * (p - a))


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
