"""The audit's canary head: each gradient canary owns one row of an embedding table.

``fedmed audit empirical`` inserts canary records whose only influence on the model is
their own row of ``canary_logits`` (their path through the wrapped model is detached), so a
canary's per-sample gradient lies entirely on coordinates no real record touches. This is the
strongest canary for DP-SGD (a gradient canary): whatever the model, DP-SGD must hide
whether a canary was in the data, and the row's final value is its score. Real records map to
row 0 (a shared bias). A canary record is recognised by the sentinel in its first feature.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmed.data.canaries import SENTINEL


class CanaryHead(nn.Module):
    """``model`` plus one logit row per canary; the canaries' own input is detached."""

    def __init__(self, model: nn.Module, canaries: int, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.canary_logits = nn.Embedding(canaries + 1, num_classes)
        nn.init.zeros_(self.canary_logits.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        is_canary = flat[:, 0] == SENTINEL
        rows = torch.where(is_canary, flat[:, 1], torch.zeros_like(flat[:, 1])).long()
        clean = torch.where(is_canary.view(-1, *[1] * (x.dim() - 1)), torch.zeros_like(x), x)
        out = self.model(clean)
        out = torch.where(is_canary[:, None], out.detach(), out)
        return out + self.canary_logits(rows)
