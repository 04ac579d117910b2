"""The hospital ClientApp: trains on its own data and sends only a model delta and counts."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from fedmed.config import FedMedConfig
from fedmed.data import load_site, site_names
from fedmed.errors import ConfigError, SiteError
from fedmed.models import build_loss, build_model
from fedmed.train import TrainSettings, evaluate, get_weights, make_loader, set_weights, train_local

T = TypeVar("T")

# Metric keys a site may send; nothing else leaves the site besides model arrays.
FIT_METRIC_KEYS = ("site", "num_examples", "train_loss")


def _site_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Re-raise any failure as a SiteError, so the coordinator can name the site that failed."""

    @functools.wraps(method)
    def wrapper(self: HospitalSite, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except SiteError:
            raise
        except Exception as exc:
            raise SiteError(self.name, f"{type(exc).__name__}: {exc}") from exc

    return wrapper


class HospitalSite(NumPyClient):
    """One hospital. Its data is loaded once per process; a fresh model is built every round."""

    def __init__(self, cfg: FedMedConfig, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.name = site_names(cfg)[index]
        try:
            self.data = load_site(cfg, index)
        except Exception as exc:
            raise SiteError(self.name, str(exc)) from exc
        self.loss_fn = build_loss(cfg.model.name)

    def _model_with(self, parameters: list[np.ndarray]) -> Any:
        model = build_model(self.cfg.model.name, self.data.schema, self.cfg.seed)
        set_weights(model, parameters)
        return model

    @_site_errors
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train locally from the global model and return the delta (new - global)."""
        model = self._model_with(parameters)
        server_round = int(config.get("server_round", 0))
        loader = make_loader(
            self.data.x_train,
            self.data.y_train,
            self.cfg.model.batch_size,
            self.cfg.seed * 100_003 + server_round,
        )
        loss = train_local(model, self.loss_fn, loader, TrainSettings.from_config(self.cfg))
        delta = [new - old for new, old in zip(get_weights(model), parameters, strict=True)]
        del model
        gc.collect()
        n = len(self.data.y_train)
        return delta, n, {"site": self.name, "num_examples": n, "train_loss": loss}

    @_site_errors
    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate the global model on this site's test split; only counts leave the site."""
        model = self._model_with(parameters)
        stats = evaluate(
            model, self.loss_fn, self.data.x_test, self.data.y_test, self.data.num_classes
        )
        return stats.loss, stats.num_examples, {"site": self.name, **stats.to_metrics()}


def site_index(cfg: FedMedConfig, node_config: dict[str, Any]) -> int:
    """Simulation passes ``partition-id``; a deployed SuperNode passes ``site`` (its name)."""
    if "site" in node_config:
        names = site_names(cfg)
        name = str(node_config["site"])
        if name not in names:
            raise ConfigError("node_config.site", name, f"one of {names}")
        return names.index(name)
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    raise ConfigError("node_config", dict(node_config), "a 'site' name or a 'partition-id'")


def make_client_fn(
    resolve_config: Callable[[Context], FedMedConfig],
) -> Callable[[Context], Client]:
    """The ClientApp's client_fn; ``resolve_config`` says where the run's config comes from."""

    def client_fn(context: Context) -> Client:
        cfg = resolve_config(context)
        return HospitalSite(cfg, site_index(cfg, dict(context.node_config))).to_client()

    return client_fn


def make_client_app(cfg: FedMedConfig) -> ClientApp:
    """ClientApp for an in-process simulation whose config is known up front."""
    return ClientApp(client_fn=make_client_fn(lambda _context: cfg))
