"""Per-sample clipping in a single backward pass: book-keeping (Bu et al., 2023).

Opacus' ghost clipping runs two backward passes (one for the per-sample norms, one for the
clipped sum); its hooks mode materialises every record's gradient. For the layers fedmed's
models are made of, one ordinary backward pass already holds everything needed: hooks keep
each layer's input activations and output gradients, from which each record's gradient norm
is exact and the clipped sum is one more product. Linear layers need no per-record gradient
at all (||b_i a_i^T|| = ||a_i|| ||b_i||); Conv2d and GroupNorm get theirs from the unfolded
input. Only the clipping is computed here: Opacus still does the Poisson sampling, the noise
(``DPOptimizerFastGradientClipping`` adds it to the clipped sum this module leaves in each
``p.grad``) and the accounting. ``tests/privacy/test_bookkeeping.py`` checks the norms and
the noisy clipped sums against Opacus' hooks mode on real batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)
NORM_EPSILON = 1e-6  # Opacus' own: clip factor = min(1, C / (norm + 1e-6))


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of the modules holding parameters of their own that book-keeping cannot clip."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
        and not isinstance(module, SUPPORTED)
    ]


class BookKeeping:
    """Hooks on a model's Linear, Conv2d and GroupNorm layers that turn one backward pass of
    a mean-reduced loss into each parameter's sum of per-sample clipped gradients."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        unsupported = unsupported_layers(model)
        if unsupported:
            raise ValueError(f"book-keeping clipping cannot clip {', '.join(unsupported)}")
        self.max_grad_norm = max_grad_norm
        self.layers = [m for m in model.modules() if isinstance(m, SUPPORTED)]
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.output_grads: dict[nn.Module, torch.Tensor] = {}
        self.last_norms: torch.Tensor | None = None
        self._handles = [
            handle
            for layer in self.layers
            for handle in (
                layer.register_forward_hook(self._keep_input),
                layer.register_full_backward_hook(self._keep_output_grad),
            )
        ]

    def _keep_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        if torch.is_grad_enabled():
            self.inputs[module] = inputs[0].detach()

    def _keep_output_grad(self, module: nn.Module, _: Any, grad_outputs: Any) -> None:
        self.output_grads[module] = grad_outputs[0].detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.inputs.clear()
        self.output_grads.clear()

    def clip_into_grads(self) -> None:
        """Replace each parameter's ``grad`` by sum_i min(1, C / ||g_i||) g_i, g_i record i's
        gradient of its own loss (the batch mean's gradient times the batch size)."""
        per_layer = [self._per_sample(layer) for layer in self.layers]
        batch = len(next(iter(self.inputs.values()))) if self.inputs else 0
        squared = torch.zeros(batch)
        for _, norms in per_layer:
            squared += norms
        norms = squared.sqrt()
        self.last_norms = norms
        factors = (self.max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
        for layer, (clipped_sum, _) in zip(self.layers, per_layer, strict=True):
            for param, grad in zip(layer.parameters(recurse=False), clipped_sum(factors),
                                   strict=True):  # fmt: skip
                param.grad = grad.reshape(param.shape).to(param.dtype)
        self.inputs.clear()
        self.output_grads.clear()

    def _per_sample(self, layer: nn.Module) -> tuple[Any, torch.Tensor]:
        """(a function of the clip factors giving the layer's clipped sums, each record's
        squared gradient norm over the layer's parameters)."""
        a, b = self.inputs[layer], self.output_grads[layer] * len(self.inputs[layer])
        if isinstance(layer, nn.Linear):
            return _linear(layer, a, b)
        if isinstance(layer, nn.Conv2d):
            return _conv2d(layer, a, b)
        assert isinstance(layer, nn.GroupNorm)
        return _group_norm(layer, a, b)


def _linear(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    if a.dim() != 2:
        raise ValueError("book-keeping clipping takes Linear layers on (batch, features) only")
    squared = a.pow(2).sum(1) * b.pow(2).sum(1)
    if layer.bias is not None:
        squared = squared + b.pow(2).sum(1)

    def clipped_sum(factors: torch.Tensor) -> list[torch.Tensor]:
        weighted = b * factors[:, None]
        sums = [weighted.t() @ a]
        return sums + ([weighted.sum(0)] if layer.bias is not None else [])

    return clipped_sum, squared


def _conv2d(layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    if layer.groups != 1 or isinstance(layer.padding, str):
        raise ValueError("book-keeping clipping takes Conv2d with groups=1, numeric padding")
    patches = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    outputs = b.flatten(2)  # (n, out, positions)
    per_sample = torch.bmm(outputs, patches.transpose(1, 2))  # (n, out, in * kh * kw)
    squared = per_sample.pow(2).sum((1, 2))
    bias = outputs.sum(2) if layer.bias is not None else None
    if bias is not None:
        squared = squared + bias.pow(2).sum(1)

    def clipped_sum(factors: torch.Tensor) -> list[torch.Tensor]:
        sums = [torch.einsum("n,nok->ok", factors, per_sample)]
        return sums + ([factors @ bias] if bias is not None else [])

    return clipped_sum, squared


def _group_norm(
    layer: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    if not layer.affine:
        return (lambda factors: []), torch.zeros(len(a))
    normalised = F.group_norm(a, layer.num_groups, eps=layer.eps)
    dims = tuple(range(2, a.dim()))
    weight = (normalised * b).sum(dims)  # (n, channels)
    bias = b.sum(dims)
    squared = weight.pow(2).sum(1) + bias.pow(2).sum(1)

    def clipped_sum(factors: torch.Tensor) -> list[torch.Tensor]:
        return [factors @ weight, factors @ bias]

    return clipped_sum, squared
