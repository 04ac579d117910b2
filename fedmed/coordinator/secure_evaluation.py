"""Private evaluation through SecAgg+: the coordinator sees only the sum of the noisy counts.

Flower's SecAgg+ workflow aggregates fits only. Under DP with ``secagg=secaggplus`` each
evaluation round therefore runs one more SecAgg+ round whose requests name the evaluation
task (``fedmed.protocol.TASK_KEY``): each site evaluates the global model, releases its noisy
test-split counts (the Gaussian mechanism, in its ledger first) as the vector it masks,
scaled by 1 / max_weight to lie well inside the clipping range, and reports the weight
max_weight, the same for every site, so Flower's weighted mean is the plain mean of the
vectors. The coordinator multiplies it back into the sum over the sites. No single site's
counts are ever unmasked; only its public test-split size and its accounting travel beside.
The global model is left as it is. Quantization adds at most max_weight x 2 x
clipping_range / quantization_range per site to each count (0.004 with the defaults).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedmed.coordinator.federated import FederatedStrategy
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.secagg import RecordedSecAggPlusWorkflow
from fedmed.protocol import EVALUATE_TASK, SITE_KEY, TASK_KEY, EvaluateReport, RecordError
from fedmed.secure.params import SecAggParams


class _EvaluationTask(Strategy):
    """What SecAgg+ drives in an evaluation round: requests naming the task, to the sites
    the run's strategy samples for evaluation; the unmasked mean becomes the round's figures."""

    def __init__(
        self, strategy: FederatedStrategy, recorder: RunRecorder, params: SecAggParams
    ) -> None:
        self.strategy = strategy
        self.recorder = recorder
        self.params = params
        self.done = False

    def __repr__(self) -> str:
        return "SecureEvaluation"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        run_round = server_round + self.strategy.round_offset
        evaluated = self.strategy.evaluation_parameters(parameters)
        sampled = self.strategy.inner.configure_evaluate(run_round, evaluated, client_manager)
        return [
            (proxy, FitIns(ins.parameters, {**ins.config, TASK_KEY: EVALUATE_TASK}))
            for proxy, ins in sampled
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The sum of the sites' noisy counts, recorded as the round's evaluation; no new
        global model (None)."""
        run_round = server_round + self.strategy.round_offset
        self.recorder.record_failures(run_round, "evaluate", list(failures))
        reports = []
        for _, res in results:
            try:
                reports.append(EvaluateReport.from_metrics(res.metrics, masked=True))
            except RecordError as err:
                site = res.metrics.get(SITE_KEY)
                name = site if isinstance(site, str) else "unknown"
                problem = RuntimeError(f"site '{name}': {err}")
                self.recorder.record_failures(run_round, "evaluate", [problem])
        if results:
            [mean] = parameters_to_ndarrays(results[0][1].parameters)
            masked_sum = mean.astype(np.float64) * len(results) * self.params.max_weight
            self.recorder.record_evaluation(run_round, reports, masked_sum)
            self.done = True
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class SecureEvaluationWorkflow(RecordedSecAggPlusWorkflow):
    """The evaluate workflow of a DP + SecAgg+ run: one SecAgg+ round of the evaluation task
    in each of the run's evaluation rounds (``federation.evaluate_every``)."""

    def __init__(
        self, params: SecAggParams, strategy: FederatedStrategy, recorder: RunRecorder
    ) -> None:
        super().__init__(params, strategy, recorder)
        self.task = _EvaluationTask(strategy, recorder, params)

    def __call__(self, grid: Grid, context: Any) -> None:
        server_round = self._current_round(context)
        if server_round not in self.strategy.evaluation_rounds:
            self.strategy.end_round(server_round, evaluated=False)
            return
        self.task.done = False
        task = LegacyContext(context, context.config, self.task, context.client_manager)
        self._run(grid, task)
        if not self.task.done:
            self.recorder.record_secure_round_failure(
                server_round,
                f"round {server_round}: the secure evaluation failed with {self._survivors} "
                f"site(s) left (reconstruction threshold {self.params.reconstruction_threshold})"
                "; no site's counts were revealed",
            )
        self.strategy.end_round(server_round, evaluated=self.task.done)
