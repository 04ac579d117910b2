"""Book-keeping clipping (``privacy.clipping=bookkeeping``) against Opacus' hooks mode on real
batches: the same per-sample norms, the same clipped noisy sums with the same noise, and
Opacus' own sampling and accounting around it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedmed.config.schema import FedMedConfig
from fedmed.data import load_site
from fedmed.models import build_loss, build_model, class_weights
from fedmed.privacy.bookkeeping import BookKeeping, unsupported_layers
from fedmed.privacy.dp_sgd import DpSgdSettings, make_private_training, poisson_plan, train_private
from fedmed.train import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CASES = {
    "heart svm": (("dataset=heart", "model=svm"), 48),
    "heart logreg, class weights": (
        ("dataset=heart", "model=logreg", "model.class_weight=[2.0,0.5]"),
        48,
    ),
    "pneumonia cnn": (("dataset=pneumonia", "model=cnn"), 24),
    "pneumonia dpcnn": (("dataset=pneumonia", "model=dpcnn"), 24),
    "pneumonia scatter": (("dataset=pneumonia", "model=scatter"), 24),
}


def _hooks_norms(model: torch.nn.Module) -> torch.Tensor:
    samples = [p.grad_sample.flatten(1) for p in model.parameters() if p.grad_sample is not None]
    return torch.cat(samples, dim=1).norm(dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_norms_and_noisy_clipped_sums_match_opacus_hooks_mode(
    compose: Callable[..., FedMedConfig], case: str
) -> None:
    overrides, size = CASES[case]
    cfg = compose(*overrides)
    site = load_site(cfg, 0)
    both = np.concatenate([np.flatnonzero(site.y_train == c)[: size // 2] for c in (0, 1)])
    x, y = torch.from_numpy(site.x_train[both]), torch.from_numpy(site.y_train[both])
    loss = build_loss(cfg.model.name, class_weights(cfg.model.class_weight, site.y_train, 2))
    settings = TrainSettings(epochs=1, batch_size=size, lr=0.1, momentum=0.9, weight_decay=1e-3)
    # a bound between the records' norms: some clipped, some not
    probe = make_private_training(build_model(cfg.model.name, site.schema, 0), loss,
                                  site.x_train, site.y_train, settings,
                                  DpSgdSettings(0.0, 1e9, "hooks", "prv"))  # fmt: skip
    probe.loss_fn(probe.model(x), y).backward()
    max_norm = float(_hooks_norms(probe.model).median())
    trained = {}
    for mode in ("hooks", "bookkeeping"):
        private = make_private_training(
            build_model(cfg.model.name, site.schema, 0),
            loss,
            site.x_train,
            site.y_train,
            settings,
            DpSgdSettings(1.3, max_norm, mode, "prv"),
            rng=torch.Generator().manual_seed(7),  # the same noise for both
        )
        private.optimizer.zero_grad()
        private.loss_fn(private.model(x), y).backward()
        if mode == "hooks":
            norms = _hooks_norms(private.model)
        private.optimizer.step()
        if mode == "bookkeeping":
            ours = private.optimizer.clipper.last_norms
            assert torch.allclose(ours, norms, rtol=1e-5, atol=1e-6), (ours - norms).abs().max()
        trained[mode] = [p.detach().clone() for p in private.model.parameters()]
        assert private.engine.accountant.history == [(1.3, private.loader.sample_rate, 1)]
    assert min(norms) < max_norm < max(norms)
    for hooks, ours in zip(trained["hooks"], trained["bookkeeping"], strict=True):
        assert torch.allclose(hooks, ours, atol=1e-6), (hooks - ours).abs().max()


def test_a_round_of_bookkeeping_dp_sgd_takes_exactly_the_accounted_plan(
    compose: Callable[..., FedMedConfig],
) -> None:
    """Poisson batches (empty ones too) through the site's own training function: Opacus'
    accountant sees the planned steps, or train_private raises."""
    cfg = compose("dataset=heart", "model=svm")
    site = load_site(cfg, 2)  # Switzerland, 92 records: batches of 16 expected
    model = build_model(cfg.model.name, site.schema, 0)
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)
    plan = poisson_plan(len(site.y_train), 16, 2, sigma=1.1)
    before = [p.detach().clone() for p in model.parameters()]
    dp = DpSgdSettings(1.1, 1.0, "bookkeeping", "prv")
    result = train_private(model, build_loss(cfg.model.name), site.x_train, site.y_train,
                           settings, dp, plan, rng=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.steps == plan.steps and np.isfinite(result.loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_layers_it_cannot_clip_are_refused_by_name() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert unsupported_layers(model) == ["1"]
    with pytest.raises(ValueError, match="cannot clip 1"):
        BookKeeping(model, 1.0)
