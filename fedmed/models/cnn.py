"""DiagnosisNet: the conv32 -> conv64 -> fc128 shape, with GroupNorm so Opacus can train it."""

from __future__ import annotations

import torch
from torch import nn


class DiagnosisNet(nn.Module):
    """Two 3x3 conv blocks (each halves the image) and a 128-unit hidden layer.

    GroupNorm instead of BatchNorm: BatchNorm mixes records within a batch, which per-sample
    gradient clipping (DP-SGD) cannot allow.
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, groups: int = 8
    ) -> None:
        super().__init__()
        reduced = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.GroupNorm(groups, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.GroupNorm(groups, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * reduced * reduced, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
