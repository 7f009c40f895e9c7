"""Teacher -> hybrid: which layers stay attention, and the attention -> Mamba2 weight mapping.

A converted layer's Mamba2 mixer starts as the attention it replaces, with the softmax dropped
(PAPER.md section 1):  C <- W_Q,  B <- W_K,  x <- W_V,  out_proj <- W_O, head by head, and
x / B at the key/value width (grouped-query attention). The gate z, dt, A, D and the conv are new.
Everything else (kept attention layers, MLPs, norms, embeddings, LM head) is copied unchanged.

``convert`` also takes a hybrid: then it turns more of its attention layers into Mamba layers
(progressive distillation), and copies its existing Mamba layers as they are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .models.configuration import SUPPORTED_BASE_MODEL_TYPES, HybridConfig
from .models.modeling import HybridForCausalLM, Mamba2Mixer


class UnsupportedArchitectureError(ValueError):
    pass


def attention_layers_for(num_layers: int, attention: float | Sequence[int]) -> list[int]:
    """The layer indices kept as attention.

    A fraction keeps every k-th layer (k = 1/fraction), counted back from the last layer so the
    last layer stays attention: for 32 layers, 0.5 keeps 1, 3, ..., 31; 0.25 keeps 3, 7, ..., 31;
    0.125 keeps 7, 15, 23, 31. A fraction whose inverse is no integer keeps round(f * L) layers
    spread evenly the same way. A sequence is taken as explicit indices.
    """
    if isinstance(attention, bool):
        raise TypeError("attention must be a fraction in [0, 1] or a list of layer indices, not a bool")
    if isinstance(attention, (int, float)):
        fraction = float(attention)
        if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
            raise ValueError(f"attention fraction must be in [0, 1], got {attention}")
        if fraction == 0.0:
            return []
        step = 1.0 / fraction
        if abs(step - round(step)) < 1e-9:
            k = round(step)
            return [i for i in range(num_layers) if (num_layers - 1 - i) % k == 0]
        count = max(1, round(fraction * num_layers))
        return sorted({num_layers - 1 - math.floor(j * num_layers / count) for j in range(count)})
    indices = [int(i) for i in attention]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"attention layer indices {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"attention layer indices repeat: {indices}")
    return sorted(indices)


@torch.no_grad()
def init_mamba_from_attention(mixer: Mamba2Mixer, attention: nn.Module) -> None:
    """Copy an attention layer's Q/K/V/O projections into a Mamba2 mixer (C, B, x, out_proj)."""
    rows = mixer.in_proj_slices
    for name, proj in (("C", attention.q_proj), ("B", attention.k_proj), ("x", attention.v_proj)):
        target = mixer.in_proj.weight[rows[name]]
        if target.shape != proj.weight.shape:
            raise ValueError(
                f"cannot map {name}: mixer rows {tuple(target.shape)} vs attention {tuple(proj.weight.shape)}; "
                "the conversion needs d_state = head_dim and one SSM head per attention head"
            )
        target.copy_(proj.weight)
        if mixer.in_proj.bias is not None:
            bias = proj.bias if proj.bias is not None else torch.zeros_like(mixer.in_proj.bias[rows[name]])
            mixer.in_proj.bias[rows[name]].copy_(bias)
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(attention.o_proj.bias)


def _hybrid_config_for(model: PreTrainedModel, attn_layers: list[int]) -> HybridConfig:
    config = model.config
    if isinstance(model, HybridForCausalLM):
        fields = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            fields.pop(key, None)
        fields["attn_layers"] = attn_layers
        return HybridConfig(**fields)
    first_attention = model.model.layers[0].self_attn
    return HybridConfig.from_base_config(
        config,
        attn_layers=attn_layers,
        mamba_proj_bias=first_attention.q_proj.bias is not None,
        mamba_out_proj_bias=first_attention.o_proj.bias is not None,
    )


def convert(
    teacher: PreTrainedModel,
    attention: float | Sequence[int] = 0.5,
    *,
    seed: int = 0,
) -> HybridForCausalLM:
    """Build the hybrid of ``teacher`` that keeps ``attention`` (a fraction or indices) as attention.

    ``teacher`` is a Llama, Mistral or Qwen2 causal LM, or a hybrid (then only its attention
    layers can be converted further). The result has the teacher's dtype and device; the new
    Mamba parameters that attention has no counterpart for are drawn with ``seed``.
    """
    model_type = getattr(getattr(teacher, "config", None), "model_type", None)
    is_hybrid = isinstance(teacher, HybridForCausalLM)
    if not is_hybrid and (model_type not in SUPPORTED_BASE_MODEL_TYPES or not hasattr(teacher, "model")):
        raise UnsupportedArchitectureError(
            f"cannot convert a {model_type!r} model ({type(teacher).__name__}); supported teacher "
            f"architectures: {', '.join(SUPPORTED_BASE_MODEL_TYPES)} (Llama-family causal LMs)"
        )
    num_layers = teacher.config.num_hidden_layers
    attn_layers = attention_layers_for(num_layers, attention)
    if is_hybrid:
        lost = sorted(set(attn_layers) - set(teacher.config.attn_layers))
        if lost:
            raise ValueError(
                f"layers {lost} are already Mamba layers in this hybrid and cannot become attention again; "
                f"its attention layers are {teacher.config.attn_layers}"
            )
    config = _hybrid_config_for(teacher, attn_layers)
    config._attn_implementation = teacher.config._attn_implementation

    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hybrid = HybridForCausalLM(config)
    hybrid.to(dtype=param.dtype, device=param.device)

    # Copy every tensor the two models share by name; what is left are the new Mamba layers.
    teacher_state = teacher.state_dict()
    hybrid_state = hybrid.state_dict()
    with torch.no_grad():
        for name, tensor in hybrid_state.items():
            if name in teacher_state:
                tensor.copy_(teacher_state[name])
        newly_converted = [
            i for i in config.mamba_layers
            if not (is_hybrid and i in teacher.config.mamba_layers)
        ]
        for i in newly_converted:
            init_mamba_from_attention(hybrid.model.layers[i].mamba, teacher.model.layers[i].self_attn)

    missing = [n for n in hybrid_state if n not in teacher_state and ".mamba." not in n]
    if missing:
        raise RuntimeError(f"conversion left tensors without a source: {missing[:5]}")
    hybrid.generation_config = copy.deepcopy(teacher.generation_config)
    hybrid.train(teacher.training)
    return hybrid


__all__ = ["UnsupportedArchitectureError", "attention_layers_for", "convert", "init_mamba_from_attention"]
