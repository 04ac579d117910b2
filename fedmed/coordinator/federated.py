"""A strategy wrapper that turns site deltas into a global model and records every round.

Sites send ``delta = local - global``. The wrapper adds the current global model back before
handing results to the inner Flower strategy, so FedAvg/FedProx/FedAdam/FedYogi run unchanged;
with secure aggregation the single aggregate it receives is converted the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedmed.coordinator.recorder import RunRecorder
from fedmed.protocol import SITE_KEY, EvaluateReport, FitReport, RecordError
from fedmed.secure.update_checks import update_problem


class FederationStopped(RuntimeError):
    """Raised to end the run early: fewer than federation.min_sites sites sent an update.

    ``status`` is ``budget_exhausted`` when enough sites answered but some declined for their
    privacy budget (a clean end), ``stopped`` when sites failed.
    """

    def __init__(self, message: str, status: str = "stopped") -> None:
        super().__init__(message)
        self.status = status


class FederatedStrategy(Strategy):
    """Wraps an inner strategy: delta -> weights conversion, min_sites check, recording."""

    def __init__(
        self,
        inner: Strategy,
        recorder: RunRecorder,
        min_sites: int,
        evaluation_rounds: list[int],
        round_offset: int = 0,
        on_round_done: Callable[[int], None] | None = None,
        average_decay: float | None = None,
    ) -> None:
        """``evaluation_rounds``: the rounds after which the sites evaluate the global model.
        ``round_offset``: rounds already done before this run (resume); Flower counts
        from 1 again, the sites and the records continue the run's numbering.
        ``on_round_done(round)`` runs at the end of each round (checkpointing).
        ``average_decay``: evaluate (and save) the moving average of the global models
        (``strategy.average_decay``); None: the global model itself."""
        self.inner = inner
        self.recorder = recorder
        self.min_sites = min_sites
        self.evaluation_rounds = set(evaluation_rounds)
        self.round_offset = round_offset
        self.on_round_done = on_round_done
        self.global_weights: list[np.ndarray] | None = None
        self.average_decay = average_decay
        self.averaged_weights: list[np.ndarray] | None = None
        self.last_aggregated_round = 0

    @property
    def evaluated_weights(self) -> list[np.ndarray] | None:
        """The model the sites evaluate and the run saves: the moving average when on."""
        return self.averaged_weights if self.averaged_weights is not None else self.global_weights

    def evaluation_parameters(self, parameters: Parameters) -> Parameters:
        """What an evaluation round sends: ``parameters`` (the global model), or the average."""
        if self.average_decay is None or self.averaged_weights is None:
            return parameters
        return ndarrays_to_parameters(self.averaged_weights)

    def __repr__(self) -> str:
        return f"FederatedStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        initial = self.inner.initialize_parameters(client_manager)
        if initial is not None:
            self.global_weights = parameters_to_ndarrays(initial)
        return initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        self.recorder.start_round()
        self.global_weights = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def _update_problem(self, res: FitRes) -> str | None:
        """The coordinator's own check of an update (each site's, or SecAgg+'s aggregate):
        a NaN, an infinity or a wrong shape never reaches the global model."""
        assert self.global_weights is not None
        try:
            update = parameters_to_ndarrays(res.parameters)
        except ValueError as exc:  # not numpy arrays at all
            return f"unreadable update ({exc})"
        return update_problem(update, self.global_weights)

    def _as_weights(self, res: FitRes) -> FitRes:
        assert self.global_weights is not None
        delta = parameters_to_ndarrays(res.parameters)
        weights = [g + d for g, d in zip(self.global_weights, delta, strict=True)]
        return FitRes(res.status, ndarrays_to_parameters(weights), res.num_examples, res.metrics)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        self.recorder.record_failures(server_round, "fit", list(failures))
        trained: list[tuple[ClientProxy, FitRes]] = []
        for proxy, res in results:
            try:
                report = FitReport.from_metrics(res.metrics)
            except RecordError as err:
                unreadable = f"unreadable fit report ({err})"
                self.recorder.record_rejected(server_round, _claimed_site(res.metrics), unreadable)
                failures = [*failures, RuntimeError(unreadable)]
                continue
            self.recorder.record_fit(server_round, res.num_examples, report)
            if report.declined is not None:
                continue
            problem = self._update_problem(res)
            if problem is None:
                trained.append((proxy, res))
            else:
                self.recorder.record_rejected(server_round, report.site, problem)
                failures = [*failures, RuntimeError(problem)]
        if len(trained) < self.min_sites:
            declined = len(results) - len(trained)
            raise FederationStopped(
                f"round {server_round}: {len(trained)} site(s) returned an update "
                f"({declined} declined for their privacy budget, {len(failures)} failed), "
                f"fewer than federation.min_sites={self.min_sites}",
                status="budget_exhausted" if declined and not failures else "stopped",
            )
        self.recorder.secure.record_round([res.num_examples for _, res in trained])
        converted = [(proxy, self._as_weights(res)) for proxy, res in trained]
        parameters, metrics = self.inner.aggregate_fit(server_round, converted, failures)
        self.last_aggregated_round = server_round
        if parameters is not None:
            self.global_weights = parameters_to_ndarrays(parameters)
            if self.average_decay is not None:
                self.averaged_weights = moving_average(
                    self.averaged_weights, self.global_weights, self.average_decay
                )
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The sites evaluate only in the run's evaluation rounds (``federation.evaluate_every``):
        a round without one still ends here, with its progress line and checkpoint."""
        server_round += self.round_offset
        if server_round not in self.evaluation_rounds:
            self.end_round(server_round, evaluated=False)
            return []
        evaluated = self.evaluation_parameters(parameters)
        return self.inner.configure_evaluate(server_round, evaluated, client_manager)

    def end_round(self, server_round: int, evaluated: bool) -> None:
        """The round is over: its progress line when no evaluation printed one, its
        checkpoint."""
        if not evaluated:
            self.recorder.record_unevaluated(server_round)
        if self.on_round_done is not None:
            self.on_round_done(server_round)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.round_offset
        self.recorder.record_failures(server_round, "evaluate", list(failures))
        reports = []
        for _, res in results:
            try:
                reports.append(EvaluateReport.from_metrics(res.metrics))
            except RecordError as err:
                problem = RuntimeError(f"site '{_claimed_site(res.metrics)}': {err}")
                self.recorder.record_failures(server_round, "evaluate", [problem])
        loss: float | None = None
        metrics: dict[str, Any] = {}
        record = self.recorder.record_evaluation(server_round, reports)
        if record is not None:
            loss, metrics = record.loss, {"accuracy": record.accuracy}
            measured = {"auc": record.auc, **record.clinical()}
            metrics.update({name: value for name, value in measured.items() if value is not None})
        self.end_round(server_round, evaluated=True)
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round + self.round_offset, parameters)


def moving_average(
    average: list[np.ndarray] | None, weights: list[np.ndarray], decay: float
) -> list[np.ndarray]:
    """decay x average + (1 - decay) x weights; the first round's weights start it."""
    if average is None:
        return [w.copy() for w in weights]
    return [decay * a + (1.0 - decay) * w for a, w in zip(average, weights, strict=True)]


def _claimed_site(metrics: dict[str, Scalar]) -> str:
    """The name an unreadable report gives (only to say whose it was)."""
    site = metrics.get(SITE_KEY)
    return site if isinstance(site, str) else "unknown"
