"""Class-weighted losses: each record's gradient is its own (as DP-SGD's clipping needs),
Opacus' clipping modes agree on them, and the config refuses what DP cannot allow."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from fedmed.config.schema import FedMedConfig, ModelName
from fedmed.data import load_site
from fedmed.errors import ConfigError
from fedmed.models import build_loss, build_model, class_weights
from fedmed.privacy.dp_sgd import DpSgdSettings, make_private_training
from fedmed.train import TrainSettings, make_loader, train_local

WEIGHTS = (0.3, 2.5)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", [ModelName.svm, ModelName.logreg])
def test_a_records_loss_gradient_does_not_depend_on_the_other_records_labels(
    name: ModelName,
) -> None:
    """PyTorch's weight= mean divides by the batch's summed weights, so flipping one label
    moves every record's gradient; the class-weighted loss keeps each record's its own."""
    torch.manual_seed(0)
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    flipped = labels.clone()
    flipped[5] = 1

    def row_grads(loss_fn: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss_fn(logits, y), logits)
        return grad[:5]

    ours = build_loss(name, WEIGHTS)
    assert torch.equal(row_grads(ours, labels), row_grads(ours, flipped))
    torch_weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS))
    assert not torch.allclose(row_grads(torch_weighted, labels), row_grads(torch_weighted, flipped))
    base = build_loss(name)
    base.reduction = "none"
    expected = (base(logits, labels) * torch.tensor(WEIGHTS)[labels]).mean()
    assert torch.allclose(ours(logits, labels), expected)


@pytest.mark.parametrize(
    ("overrides", "size"),
    [(("dataset=heart", "model=logreg"), 64), (("dataset=pneumonia", "model=cnn"), 12)],
)
def test_opacus_clips_each_weighted_record_as_computed_by_hand_in_every_mode(
    compose: Callable[..., FedMedConfig], overrides: tuple[str, ...], size: int
) -> None:
    """Noise 0, one batch of real records: ghost and hooks clipping both give
    sum_i clip_C(grad(w[y_i] * loss_i)) / batch, the per-record gradients taken one by one."""
    cfg = compose(*overrides)
    site = load_site(cfg, 0)
    both = np.concatenate([np.flatnonzero(site.y_train == c)[: size // 2] for c in (0, 1)])
    x, y = site.x_train[both], site.y_train[both]
    reference_model = build_model(cfg.model.name, site.schema, 0)
    loss_fn = build_loss(cfg.model.name, WEIGHTS)
    grads = []
    for i in range(size):
        reference_model.zero_grad()
        loss_fn(
            reference_model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])
        ).backward()
        grads.append(_flat_grad(reference_model))
    max_norm = float(torch.stack(grads).norm(dim=1).median())  # half the records clipped
    expected = sum(g * min(1.0, max_norm / (float(g.norm()) + 1e-6)) for g in grads) / size
    settings = TrainSettings(epochs=1, batch_size=size, lr=0.1, momentum=0.0, weight_decay=0.0)
    for mode in ("ghost", "hooks"):
        private = make_private_training(
            build_model(cfg.model.name, site.schema, 0),
            build_loss(cfg.model.name, WEIGHTS),
            x,
            y,
            settings,
            DpSgdSettings(0.0, max_norm, mode, "prv"),
            rng=torch.Generator().manual_seed(0),
        )
        private.optimizer.zero_grad()
        private.loss_fn(private.model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        private.optimizer.pre_step()  # clip, add (zero) noise, divide by the expected batch
        assert torch.allclose(_flat_grad(private.model), expected, atol=1e-6), mode


def test_balanced_weights_are_sklearns_on_a_real_imbalanced_site(
    compose: Callable[..., FedMedConfig],
) -> None:
    """Switzerland's training split is about 93% positive."""
    site = load_site(compose("dataset=heart"), 2)
    weights = class_weights("balanced", site.y_train, 2)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=site.y_train)
    assert weights is not None and np.allclose(weights, expected)
    assert weights[0] > 5 * weights[1]
    assert class_weights("none", site.y_train, 2) is None
    assert class_weights(None, site.y_train, 2) is None
    assert class_weights([1, 4], site.y_train, 2) == (1.0, 4.0)
    one_class = class_weights("balanced", np.ones(10, dtype=np.int64), 2)
    assert one_class == (0.0, 1.0)


def test_weighting_the_minority_class_raises_its_sensitivity_on_real_records(
    compose: Callable[..., FedMedConfig],
) -> None:
    """Switzerland's few negatives: unweighted training predicts almost everyone positive;
    balanced weights make the model find negatives (specificity) at some cost elsewhere."""
    cfg = compose("dataset=heart", "model=logreg")
    site = load_site(cfg, 2)
    settings = TrainSettings(epochs=30, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0)

    def specificity(weights: tuple[float, ...] | None) -> float:
        model = build_model(cfg.model.name, site.schema, 0)
        loader = make_loader(site.x_train, site.y_train, 16, seed=0)
        train_local(model, build_loss(cfg.model.name, weights), loader, settings)
        with torch.no_grad():
            predicted = model(torch.from_numpy(site.x_train)).argmax(dim=1).numpy()
        negatives = site.y_train == 0
        return float((predicted[negatives] == 0).mean())

    balanced = class_weights("balanced", site.y_train, 2)
    assert specificity(balanced) >= specificity(None) + 0.3


def test_config_refuses_balanced_weights_under_dp_and_bad_lists(
    compose: Callable[..., FedMedConfig],
) -> None:
    with pytest.raises(ConfigError, match=r"model\.class_weight.*public weights under privacy=dp"):
        compose("dataset=heart", "privacy=dp", "model.class_weight=balanced")
    compose("dataset=heart", "privacy=dp", "model.class_weight=[0.6,3.0]")
    compose("dataset=heart", "model.class_weight=balanced")
    for bad in ("[1,-2]", "[3]", "heavy", "[1,inf]"):
        with pytest.raises(ConfigError, match=r"model\.class_weight"):
            compose("dataset=heart", f"model.class_weight={bad}")


def test_a_weight_list_of_the_wrong_length_names_the_key(
    compose: Callable[..., FedMedConfig],
) -> None:
    site = load_site(compose("dataset=heart"), 0)
    with pytest.raises(ConfigError, match=r"model\.class_weight.*2 classes"):
        class_weights([1.0, 2.0, 3.0], site.y_train, 2)
