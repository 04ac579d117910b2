"""DP-SGD for one site and one round, with Opacus: Poisson sampling, clipping, Gaussian noise.

A fresh PrivacyEngine wraps a fresh model every round (re-wrapping a model raises in Opacus).
The batch sampling and the noise draw from generators seeded with fresh OS randomness, never
from the run's public seed: whoever knows the seed (the coordinator does) must not be able to
replay the noise. The steps Opacus' own accountant saw are checked against the plan the site
accounted for, so the ledger can never under-count.

Opacus is imported where it is used: a site that trains without DP, or only answers a secure
aggregation stage, never pays its seconds-long import.
"""

from __future__ import annotations

import functools
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.config.schema import ClippingMode, FedMedConfig, personal_epochs
from fedmed.privacy.accounting import DPSteps, calibrate_noise_multiplier
from fedmed.privacy.budget import SitePolicy, dp_config
from fedmed.train import TrainResult, TrainSettings, make_loader, train_local

if TYPE_CHECKING:
    from opacus import PrivacyEngine


@dataclass(frozen=True)
class DpSgdSettings:
    """The mechanism's parameters for one site and round."""

    noise_multiplier: float
    max_grad_norm: float
    clipping: str  # Opacus grad_sample_mode ("ghost", "hooks", "functorch") or "bookkeeping"
    accountant: str
    # Empirical-audit self-test only (audit.disable_noise, refused when deployed): add no
    # noise while the accountant still records the claimed noise multiplier.
    audit_disable_noise: bool = False


BOOKKEEPING = ClippingMode.bookkeeping.value


def poisson_plan(num_records: int, batch_size: int, epochs: int, sigma: float) -> DPSteps:
    """The sample rate and step count Opacus' Poisson loader will use for one round."""
    from opacus.data_loader import DPDataLoader

    plain = make_loader(
        np.zeros((num_records, 1), dtype=np.float32),
        np.zeros(num_records, dtype=np.int64),
        batch_size,
        seed=0,
    )
    poisson = DPDataLoader.from_data_loader(plain)
    return DPSteps(sigma, poisson.sample_rate, epochs * len(poisson))


@functools.lru_cache(maxsize=64)
def calibrated_noise(
    target_epsilon: float,
    delta: float,
    num_records: int,
    batch_size: int,
    epochs: int,
    rounds: int,
    accountant: str,
) -> float:
    """Noise whose planned ``rounds`` (each the Poisson loader's steps of one round, as the
    budget check records them) reach at most ``target_epsilon``; computed once per process
    (a deployed site reads it back from its ledger in later rounds)."""
    plan = poisson_plan(num_records, batch_size, epochs, sigma=0.0)
    return calibrate_noise_multiplier(
        target_epsilon, delta, plan.sample_rate, plan.steps, accountant, rounds=rounds
    )


def run_noise_multiplier(cfg: FedMedConfig, policy: SitePolicy, num_records: int) -> float:
    """The noise a site uses for a new run: ``privacy.noise_multiplier``, or calibrated once
    for the planned rounds x local epochs, plus the epochs of its personal model
    (``personalization=finetune``), at the site's delta: the whole plan reaches the target."""
    dp = dp_config(cfg)
    assert dp is not None, "only used with privacy=dp"
    if dp.noise_multiplier:
        return dp.noise_multiplier
    assert dp.target_epsilon is not None  # validate() demands one of the two
    settings = TrainSettings.from_config(cfg)
    epochs, rounds = settings.epochs, cfg.federation.rounds
    if personal_epochs(cfg):  # every step is one Poisson epoch's: count epochs, not rounds
        epochs, rounds = 1, rounds * settings.epochs + personal_epochs(cfg)
    return calibrated_noise(
        dp.target_epsilon,
        policy.delta,
        num_records,
        settings.batch_size,
        epochs,
        rounds,
        policy.accountant,
    )


def _secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass
class PrivateTraining:
    """Opacus' wrapped model, optimizer, loss and Poisson loader, and its accountant."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    loader: DataLoader
    engine: PrivacyEngine


def make_private_training(
    model: nn.Module,
    loss_fn: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    dp: DpSgdSettings,
    rng: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap a fresh model for DP-SGD. ``rng`` (seeded experiments) replaces the secret
    generators of the Poisson sampler and the noise."""
    from opacus import PrivacyEngine

    optimizer = settings.sgd(model)
    loader = make_loader(x, y, settings.batch_size, seed=0)
    loader.generator = rng or _secret_generator()  # Opacus' Poisson sampler inherits it
    if dp.clipping == BOOKKEEPING:
        return _bookkeeping_training(model, loss_fn, optimizer, loader, dp, rng)
    extra = {"criterion": loss_fn} if dp.clipping == "ghost" else {}
    with warnings.catch_warnings():
        # Opacus' secure_mode needs torchcsprng; the generators above come from OS entropy.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=dp.accountant)
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=rng or _secret_generator(),
            grad_sample_mode=dp.clipping,
            **extra,
        )
    if dp.audit_disable_noise:
        _add_no_noise(wrapped[1])
    if dp.clipping == "ghost":
        private_model, private_optimizer, private_loss, private_loader = wrapped
    else:
        private_model, private_optimizer, private_loader = wrapped
        private_loss = loss_fn
    return PrivateTraining(private_model, private_optimizer, private_loss, private_loader, engine)


def _bookkeeping_training(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DpSgdSettings,
    rng: torch.Generator | None,
) -> PrivateTraining:
    """DP-SGD with fedmed's single-backward clipping; everything else is Opacus', set up as
    ``PrivacyEngine.make_private`` sets it up: its Poisson loader, the expected batch size,
    its optimizer for pre-clipped gradients (noise, scaling) and its accountant's hook."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    from fedmed.privacy.bookkeeping import BookKeeping

    poisson = DPDataLoader.from_data_loader(loader, generator=loader.generator)
    sample_rate = 1 / len(poisson)
    clipper = BookKeeping(model, dp.max_grad_norm)
    private_optimizer = _bookkeeping_optimizer(
        clipper,
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=int(len(poisson.dataset) * sample_rate),
        generator=rng or _secret_generator(),
    )
    engine = PrivacyEngine(accountant=dp.accountant)
    private_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate))
    if dp.audit_disable_noise:
        _add_no_noise(private_optimizer)
    model.cleanup = clipper.remove  # type: ignore[assignment]  # as Opacus' wrapper has
    return PrivateTraining(model, private_optimizer, loss_fn, poisson, engine)


def _bookkeeping_optimizer(clipper: Any, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
    """Opacus' optimizer for gradients that arrive clipped and summed, fed by ``clipper``."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    class BookKeepingOptimizer(DPOptimizerFastGradientClipping):
        def pre_step(self, closure: Any = None) -> Any:
            clipper.clip_into_grads()
            return super().pre_step(closure)

    private = BookKeepingOptimizer(optimizer, **kwargs)
    private.clipper = clipper
    return private


def _add_no_noise(optimizer: Any) -> None:
    """Break the mechanism on purpose: each noise draw uses sigma 0, while Opacus' accountant
    hook (which runs after the draw) still records the claimed sigma. A silent bug of exactly
    this kind is what ``fedmed audit empirical`` must catch."""
    draw_noise = optimizer.add_noise

    def add_noise_with_sigma_zero() -> None:
        claimed = optimizer.noise_multiplier
        optimizer.noise_multiplier = 0.0
        try:
            draw_noise()
        finally:
            optimizer.noise_multiplier = claimed

    optimizer.add_noise = add_noise_with_sigma_zero


def train_private(
    model: nn.Module,
    loss_fn: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    dp: DpSgdSettings,
    plan: DPSteps,
    rng: torch.Generator | None = None,
    anchor: list[torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD for one round of ``plan.steps`` steps
    (``anchor``: the proximal term's, see ``train_local``; it is data-independent).

    Read the weights from ``model`` itself afterwards: Opacus' wrapper shares its parameters
    but prefixes their names with ``_module.``. The wrapper's hooks and per-sample gradients
    are removed before returning: they form reference cycles that would otherwise keep every
    round's model alive in a long-lived worker until a full garbage collection.
    """
    private = make_private_training(model, loss_fn, x, y, settings, dp, rng)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the input needs no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train_local(
                private.model,
                private.loss_fn,
                private.loader,
                settings,
                private.optimizer,
                private=True,
                anchor=anchor,
            )
    finally:
        private.optimizer.zero_grad(set_to_none=True)
        private.model.cleanup()  # type: ignore[operator]
    spent = [DPSteps(sigma, q, n) for sigma, q, n in private.engine.accountant.history]
    if spent != [plan]:
        raise RuntimeError(f"DP-SGD took {spent}, not the accounted plan {plan}")
    return result
