"""Teacher -> hybrid: which layers stay attention, and the attention -> Mamba2 weight mapping.

A converted layer's Mamba2 mixer starts as the attention it replaces, with the softmax dropped
(PAPER.md section 1):  C <- W_Q,  B <- W_K,  x <- W_V,  out_proj <- W_O, head by head, and
x / B at the key/value width (grouped-query attention). The gate z, dt, A, D and the conv are new.
Everything else (kept attention layers, MLPs, norms, embeddings, LM head) is copied unchanged.

How the new parameters start is the ``init`` of ``convert`` (see ``INITS``): ``"paper"`` draws
them as the paper does; ``"linear-attention"`` sets them so that a converted mixer computes
normalised linear attention with long memory and starts at a tenth of W_O's output scale
(RESULTS.md, "Where the converted hybrid starts", has the measurements behind it).

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


# What ``init="linear-attention"`` sets (the gate z keeps the paper's random draw: a neutral gate
# needs a bias or calibration data, and in the ablation a coherent gate made step 0 worse).
LINEAR_ATTENTION_DT = 1e-3  # every head: exp(dt * A) = 0.999 a token, so memory spans the context like attention
LINEAR_ATTENTION_A = 1.0  # A = -1 for every head (A_log = 0)
LINEAR_ATTENTION_OUT_SCALE = 0.1  # out_proj = 0.1 * W_O: near the identity residual, W_O's direction kept

INITS = ("paper", "linear-attention")


def check_init(init: str) -> str:
    """``init`` itself, or a ValueError naming the accepted values."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use one of {', '.join(repr(i) for i in INITS)}")
    return init


@torch.no_grad()
def init_linear_attention(mixer: Mamba2Mixer, out_scale: float = LINEAR_ATTENTION_OUT_SCALE) -> None:
    """Set a converted mixer's new parameters so it starts as normalised linear attention.

    Call after ``init_mamba_from_attention``. The conv passes x, B, C through unchanged (the tap
    on the current position 1; the earlier taps and the bias 0); dt is input-independent (its
    in_proj rows zero) at ``LINEAR_ATTENTION_DT`` with A = -``LINEAR_ATTENTION_A``, so the state
    decays slowly; D = 0 drops the skip that attention has no counterpart for. Then
    y_t ~ sum_s silu(q_t).silu(k_s) silu(v_s), normalised by the gated RMSNorm, and out_proj is
    ``out_scale`` * W_O so the layer starts close to the residual identity.
    """
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0  # causal padding: the last tap sees the current token
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()
    dt_rows = mixer.in_proj_slices["dt"]
    mixer.in_proj.weight[dt_rows].zero_()
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[dt_rows].zero_()
    dt = torch.tensor(LINEAR_ATTENTION_DT, dtype=torch.float64)
    mixer.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))  # softplus^-1(dt)
    mixer.A_log.fill_(math.log(LINEAR_ATTENTION_A))
    mixer.D.zero_()
    mixer.out_proj.weight.mul_(out_scale)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.mul_(out_scale)


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
    init: str = "paper",
) -> HybridForCausalLM:
    """Build the hybrid of ``teacher`` that keeps ``attention`` (a fraction or indices) as attention.

    ``teacher`` is a Llama, Mistral or Qwen2 causal LM, or a hybrid (then only its attention
    layers can be converted further). The result has the teacher's dtype and device; the new
    Mamba parameters that attention has no counterpart for are drawn with ``seed`` and then set
    as ``init`` says: ``"paper"`` (the default) keeps the paper's draws, ``"linear-attention"``
    applies ``init_linear_attention`` to every newly converted layer. Mamba layers a hybrid
    teacher already has are copied as they are, whatever ``init``.
    """
    check_init(init)
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
            if init == "linear-attention":
                init_linear_attention(hybrid.model.layers[i].mamba)

    missing = [n for n in hybrid_state if n not in teacher_state and ".mamba." not in n]
    if missing:
        raise RuntimeError(f"conversion left tensors without a source: {missing[:5]}")
    hybrid.generation_config = copy.deepcopy(teacher.generation_config)
    hybrid.train(teacher.training)
    return hybrid


__all__ = [
    "INITS",
    "UnsupportedArchitectureError",
    "attention_layers_for",
    "check_init",
    "convert",
    "init_linear_attention",
    "init_mamba_from_attention",
]
