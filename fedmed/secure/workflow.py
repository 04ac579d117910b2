"""The coordinator side of secure aggregation: Flower's SecAgg+ workflow, observed.

``SecAggPlusWorkflow`` hands the strategy only the unmasked sum, but it reports dropouts and a
failed round (fewer sites than the reconstruction threshold) only in its log. This subclass
tells the run recorder which site dropped out at which stage, records a failed round, and
stops the run when fewer than ``federation.min_sites`` sites remain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flwr.server import Grid, LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedmed.coordinator.federated import FederatedStrategy, FederationStopped
from fedmed.coordinator.grid import ObservedGrid
from fedmed.coordinator.recorder import RunRecorder
from fedmed.secure.params import SecAggParams

Stage = Callable[[Grid, LegacyContext, WorkflowState], bool]


def _once_each(stage: str, failures: list[Exception]) -> list[BaseException | Any]:
    """Flower 1.41 appends every error of the collect_masked_vectors stage twice (once while
    summing the masked vectors, once while building the legacy results); keep one of each."""
    half = len(failures) // 2
    texts = [str(f) for f in failures]
    kept = len(failures)
    if stage == "collect_masked_vectors" and half and texts[:half] == texts[half:]:
        kept = half
    return [failure for failure in failures[:kept]]


class RecordedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose dropouts and failed rounds land in the run's summary."""

    def __init__(
        self, params: SecAggParams, strategy: FederatedStrategy, recorder: RunRecorder
    ) -> None:
        shares: int | float = params.num_shares
        threshold: int | float = params.reconstruction_threshold
        if params.shares_follow_sampled:  # Flower: floats are proportions of those sampled
            shares, threshold = 1.0, threshold / params.num_shares
        elif threshold == params.num_shares:
            threshold = 1.0  # Flower: an int threshold must be < num_shares; 1.0 = all shares
        super().__init__(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=params.max_weight,
            clipping_range=params.clipping_range,
            quantization_range=params.quantization_range,
            timeout=params.timeout,
        )
        self.params = params
        self.strategy = strategy
        self.recorder = recorder
        self._grid: ObservedGrid | None = None
        self._survivors = 0

    def __call__(self, grid: Grid, context: Any) -> None:
        server_round = self._current_round(context)
        observed = (
            grid
            if isinstance(grid, ObservedGrid)
            else ObservedGrid(grid, self.recorder, self.strategy.round_offset)
        )
        self._grid = observed
        super().__call__(observed, context)  # type: ignore[arg-type]
        if self.strategy.last_aggregated_round != server_round:
            self._round_failed(server_round)

    def _current_round(self, context: LegacyContext) -> int:
        """The run's round number (Flower's count plus the rounds done before a resume)."""
        record = context.state.config_records[MAIN_CONFIGS_RECORD]
        return cast(int, record[WorkflowKey.CURRENT_ROUND]) + self.strategy.round_offset

    def _observed(
        self,
        stage: str,
        run_stage: Stage,
        grid: Grid,
        context: LegacyContext,
        state: WorkflowState,
    ) -> bool:
        before = set(state.active_node_ids)
        ok = run_stage(grid, context, state)
        if stage == "setup":
            before = set(state.sampled_node_ids)
        if stage in ("setup", "share_keys"):
            # A site that left before handing out its key shares is in nobody's masks; Flower
            # 1.41 would still ask the others for its shares at unmask (and fail on them).
            state.sampled_node_ids &= state.active_node_ids
        server_round = self._current_round(context)
        self.recorder.record_failures(server_round, stage, _once_each(stage, state.failures))
        state.failures.clear()  # recorded here, with their stage; not again in aggregate_fit
        for node in sorted(before - set(state.active_node_ids)):
            self.recorder.record_dropout(server_round, self._name(node), stage)
        self._survivors = len(state.active_node_ids)
        return ok

    def _name(self, node: int) -> str:
        return self._grid.site_name(node) if self._grid is not None else f"node {node}"

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        return self._observed(
            "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        # If every survivor declined (weight 0) the unmasked "average" is not finite; the
        # strategy then stops on the declines before it uses any parameters.
        return self._observed("unmask", super().unmask_stage, grid, context, state)

    def _round_failed(self, server_round: int) -> None:
        """No aggregate this round: the global model stays; stop if too few sites remain."""
        survivors = self._survivors
        reason = (
            f"round {server_round}: secure aggregation failed with {survivors} site(s) left, "
            f"below the reconstruction threshold {self.params.reconstruction_threshold}; no "
            "update (and no individual update) was revealed"
        )
        self.recorder.record_secure_round_failure(server_round, reason)
        if survivors < self.strategy.min_sites:
            raise FederationStopped(
                f"{reason}; fewer than federation.min_sites={self.strategy.min_sites} remain"
            )
