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


class DPFirstNet(nn.Module):
    """A CNN shaped for DP-SGD: few weights, GroupNorm, tanh, a pooled head.

    DP-SGD's noise is added to every weight's gradient, so the noise a step carries grows
    with the model while the clipped signal does not: a small model learns more per unit of
    privacy (Tramer & Boneh 2021; De et al. 2022). Bounded activations keep the per-sample
    gradients from exploding past the clipping bound (Papernot et al. 2021, tempered
    sigmoids); average pooling to 1x1 replaces DiagnosisNet's 400k-weight dense layer.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, kernel_size=3, padding=1),
                nn.GroupNorm(4, cout),
                nn.Tanh(),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width),
            nn.AvgPool2d(2),
            *block(width, 2 * width),
            nn.AvgPool2d(2),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
