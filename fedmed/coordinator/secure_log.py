"""What the coordinator learns about secure aggregation in a run: dropouts, failed rounds and
the quantization error bound, for the ``secure_aggregation`` block of summary.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedmed.secure.params import SecAggParams


@dataclass
class Dropout:
    """A site that stopped answering at one SecAgg+ stage of one round."""

    round: int
    site: str
    stage: str


@dataclass
class SecureAggregationLog:
    """Per-run record of the SecAgg+ protocol (``params`` is None when it is off)."""

    params: SecAggParams | None = None
    dropped: list[Dropout] = field(default_factory=list)
    failed_rounds: list[dict[str, Any]] = field(default_factory=list)
    max_quantization_error: float | None = None

    def record_round(self, weights: list[int]) -> None:
        """A round's aggregate was formed from sites with these weights (num_examples)."""
        if self.params is None:
            return
        bound = self.params.max_quantization_error([w for w in weights if w > 0])
        self.max_quantization_error = max(self.max_quantization_error or 0.0, bound)

    def summary(self) -> dict[str, Any]:
        if self.params is None:
            return {"protocol": "none"}
        p = self.params
        return {
            "protocol": "secaggplus",
            "num_shares": p.num_shares,
            "reconstruction_threshold": p.reconstruction_threshold,
            "clipping_range": p.clipping_range,
            "quantization_range": p.quantization_range,
            "max_weight": p.max_weight,
            "max_quantization_error": self.max_quantization_error,
            "dropped": [asdict(d) for d in self.dropped],
            "failed_rounds": self.failed_rounds,
        }
