"""ScatterNet: a fixed wavelet scattering transform followed by a small trained classifier.

Under DP-SGD a model learns only as much as its clipped, noised gradients carry, and on a
hospital's few hundred images an end-to-end CNN spends that signal learning features.
Tramer & Boneh (2021, "Differentially private learning needs better features") show that
handcrafted scattering features (Oyallon & Mallat) with a linear classifier beat end-to-end
DP CNNs at every epsilon they measured. The scattering is data-independent (no weights, no
statistics of anyone's records), so it adds nothing to the privacy accounting; only the
GroupNorm affine weights and the linear layer train. Kymatio computes the transform.
"""

from __future__ import annotations

import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from torch import nn

SCALES = 2  # J: the scattering averages over 2**J pixels and halves the image J times
ANGLES = 8  # L: wavelet orientations per scale
COEFFICIENTS = 1 + SCALES * ANGLES + ANGLES**2 * SCALES * (SCALES - 1) // 2  # 81 per channel


class ScatterNet(nn.Module):
    """Scattering (J=2, L=8) -> GroupNorm -> linear classifier, for square images.

    The filters are non-persistent buffers: they are rebuilt from (J, L, size) by every
    party, so they are neither saved in ``global_model.pt`` nor sent in Flower messages.
    GroupNorm normalises each image's own coefficients (no statistics across records).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.scattering = ScatteringTorch2D(J=SCALES, shape=(image_size, image_size), L=ANGLES)
        for name, buffer in list(self.scattering.named_buffers(recurse=False)):
            self.scattering.register_buffer(name, buffer, persistent=False)
        channels = in_channels * COEFFICIENTS
        reduced = image_size // 2**SCALES
        self.norm = nn.GroupNorm(COEFFICIENTS // 9 * in_channels, channels)
        self.classifier = nn.Linear(channels * reduced * reduced, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coefficients = self.scattering(x)  # (N, C, 81, H/4, W/4)
        features = coefficients.flatten(1, 2)
        return self.classifier(self.norm(features).flatten(1))
