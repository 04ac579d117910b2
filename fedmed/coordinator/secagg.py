"""The coordinator side of secure aggregation: Flower's SecAgg+ workflow, observed.

``SecAggPlusWorkflow`` hands the strategy only the unmasked sum, but it reports dropouts and a
failed round (fewer sites than the reconstruction threshold) only in its log. This subclass
tells the run recorder which site dropped out at which stage, records a failed round, and
stops the run when fewer than ``federation.min_sites`` sites remain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.common import Message
from flwr.server import Grid, LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedmed.coordinator.federated import FederatedStrategy, FederationStopped
from fedmed.coordinator.grid import ObservedGrid
from fedmed.coordinator.recorder import RunRecorder
from fedmed.protocol import Stage
from fedmed.secure.params import SecAggParams

StageRun = Callable[[Grid, LegacyContext, WorkflowState], bool]


class _StageGrid:
    """The grid as one SecAgg+ stage sees it: error replies are kept back and recorded here.

    Flower 1.41 turns an error reply into a bare ``Exception`` in ``state.failures``: twice
    at collect_masked_vectors, and at unmask it also hands them to ``aggregate_fit``, which
    would record them a second time as "fit" failures. Flower treats an error reply exactly
    like no reply (the node leaves ``active_node_ids`` either way), so holding them back
    changes nothing in the protocol and lets each failure be recorded once, in its stage.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: list[Message] = []

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._grid, attr)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.errors += [reply for reply in replies if reply.has_error()]
        return [reply for reply in replies if not reply.has_error()]


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
        self._run(grid, context)
        if self.strategy.last_aggregated_round != server_round:
            self._round_failed(server_round)

    def _run(self, grid: Grid, context: LegacyContext) -> None:
        """One SecAgg+ round of Flower's workflow, on the observed grid."""
        observed = (
            grid
            if isinstance(grid, ObservedGrid)
            else ObservedGrid(grid, self.recorder, self.strategy.round_offset)
        )
        self._grid = observed
        super().__call__(observed, context)  # type: ignore[arg-type]

    def _current_round(self, context: LegacyContext) -> int:
        """The run's round number (Flower's count plus the rounds done before a resume)."""
        record = context.state.config_records[MAIN_CONFIGS_RECORD]
        return cast(int, record[WorkflowKey.CURRENT_ROUND]) + self.strategy.round_offset

    def _observed(
        self,
        stage: str,
        run_stage: StageRun,
        grid: Grid,
        context: LegacyContext,
        state: WorkflowState,
    ) -> bool:
        before = set(state.active_node_ids)
        stage_grid = _StageGrid(grid)
        ok = run_stage(stage_grid, context, state)  # type: ignore[arg-type]
        if stage == Stage.SETUP:
            before = set(state.sampled_node_ids)
        if stage in (Stage.SETUP, Stage.SHARE_KEYS):
            # A site that left before handing out its key shares is in nobody's masks; Flower
            # 1.41 would still ask the others for its shares at unmask (and fail on them).
            state.sampled_node_ids &= state.active_node_ids
        server_round = self._current_round(context)
        # Named by the grid (the site's own SiteError, else the node the reply answers for).
        failures = [Exception(reply.error) for reply in stage_grid.errors]  # as Flower does
        self.recorder.record_failures(server_round, stage, [*failures, *state.failures])
        state.failures.clear()
        for node in sorted(before - set(state.active_node_ids)):
            self.recorder.record_dropout(server_round, self._name(node), stage)
        self._survivors = len(state.active_node_ids)
        return ok

    def _name(self, node: int) -> str:
        return self._grid.site_name(node) if self._grid is not None else f"node {node}"

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observed(Stage.SETUP, super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observed(Stage.SHARE_KEYS, super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        return self._observed(
            Stage.COLLECT_MASKED_VECTORS,
            super().collect_masked_vectors_stage,
            grid,
            context,
            state,
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        # If every survivor declined (weight 0) the unmasked "average" is not finite; the
        # strategy then stops on the declines before it uses any parameters.
        return self._observed(Stage.UNMASK, super().unmask_stage, grid, context, state)

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
