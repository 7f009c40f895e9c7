"""Int8 weights for a speculative draft: its decoder layers read half the bytes per step.

A draft only proposes tokens. The target verifies every one of them, so greedy output stays
exactly the target's, and sampling keeps the target's distribution, whatever the draft
computes; the draft's precision moves only how often its proposals are accepted. At batch 1 a
draft step is bound by reading its weights, so weight-only int8 (one scale per output row,
symmetric, round to nearest) halves what its layers read. On CUDA the split-K GEMV reads the
int8 tiles and applies the scales where the sums finish (``weight_scale`` in
:func:`mambaify.ops.small_batch_linear`); elsewhere :func:`mambaify.ops.reference.scaled_linear`
computes the same product. The LM head stays as it is (a draft's head is cut to its frequent
tokens instead, ``draft_vocab``), and so do the embeddings, norms and Mamba's small parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.reference import scaled_linear


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale in the weight's dtype) of a floating-point (N, K) matrix:
    symmetric, each row's largest magnitude at 127, rounded to nearest."""
    absmax = weight.abs().amax(dim=1, keepdim=True).float()
    scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)  # a zero row stays zero
    ints = torch.round(weight.float() / scale).clamp_(-127, 127).to(torch.int8)
    return ints, scale.squeeze(1).to(weight.dtype)


class Int8Linear(nn.Linear):
    """A linear layer whose ``weight`` is int8 (N, K) with a float scale per row
    (``weight_scale``, N): ``F.linear(x, weight) * weight_scale + bias``, the product over the
    integers. Inference only; ``.to(dtype)`` casts the scales and the bias, never the integers."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight first
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(*quantize_rows(linear.weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.bias, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def weight_scale(layer: nn.Module) -> torch.Tensor | None:
    """An :class:`Int8Linear`'s row scales, None for a layer of floating-point weights."""
    return getattr(layer, "weight_scale", None)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Turn every linear layer of ``model``'s decoder layers into an :class:`Int8Linear`, in place;
    returns ``model``. Meant for a speculative draft (any causal LM of the Llama family or a
    mambaify hybrid). Raises ValueError for a model without decoder layers."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"quantize_int8: {type(model).__name__} has no decoder layers (model.model.layers); "
                         "give a causal LM of the Llama family or a mambaify hybrid")
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Int8Linear.from_linear(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "is_quantized", "quantize_int8", "quantize_rows", "weight_scale"]
