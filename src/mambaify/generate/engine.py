"""Batched generation with static caches and a decode step that a CUDA graph can replay.

``model.generate()`` stays the transformers path. This engine is the fast one: caches sized once
for a batch and a length, one prefill pass over the left-padded prompts, then one fixed-shape
decode step per token that reads and writes the caches in place. It runs the model's own modules
(projections, conv, norms, MLPs, rotary embedding), so it needs no copy of the weights, and it
serves a :class:`~mambaify.models.modeling.HybridForCausalLM` or a plain Llama-family teacher
(then every layer is attention).

Slots. All rows of a request share one slot numbering: the prompt batch, left-padded to width
T, fills slots 0..T-1, and decode step i writes slot T+i in every row. Row b's padding is the
slots below ``pad_lengths[b]``; so a token's position (for RoPE) is its slot minus the row's
padding, and a query at slot s may attend to the slots in [pad_lengths[b], s]. A left-padded
row therefore computes what its prompt alone computes, and one decode step is the same for every
row: fixed shapes, no branching on values, so CUDA graphs can capture it.

Compiled decode (``Engine(compile=...)``): the fixed-shape step is compiled by torch.compile
(whole graph, static shapes), which fuses the many small kernels of a step (norms, RoPE, SiLU *
up, residual adds, the mask) that cost a few microseconds each even inside a CUDA graph; the
engine then captures the compiled step in its CUDA graph as it captures the eager one. The
Mamba kernels stay one opaque custom op each (see :mod:`mambaify.ops`).

Short prompts (``generate`` / ``stream``): a prompt batch of at most 2048 columns and 4096 tokens is left-padded
to the next of a few widths (PREFILL_GRAPH_WIDTHS) and its prefill replayed from a CUDA graph
captured once per (batch size, width). Padding is masked, so the tokens are the unpadded
prompt's; eager, the prefill of a short prompt costs its hundreds of kernel launches.

Reading order: cache buffers -> AttentionRunner / MambaRunner (one token mixer, prefill and
decode) -> DecoderLayerRunner -> DecodingStack (the whole model) -> EagerDecoder /
CUDAGraphDecoder -> GraphedPrefill -> compile_step -> Engine -> generate().
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.cache import MambaLayerCache
from ..models.modeling import Mamba2Mixer
from ..ops.attention import decode_attention_op
from .sampling import SamplingParams, greedy_tokens, sample_next_tokens
from .quantize import weight_scale

Prompts = torch.Tensor | Sequence[Sequence[int]]
logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Static cache buffers


@dataclass
class KVBuffers:
    """Keys (RoPE applied) and values of one attention layer, each (batch, kv_heads, slots, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor

    def rows(self, n: int) -> KVBuffers:
        return KVBuffers(self.keys[:n], self.values[:n])

    def by_row(self) -> list[torch.Tensor]:
        """Every buffer, as a view with the batch first."""
        return [self.keys, self.values]


@dataclass
class MambaBuffers:
    """State of one Mamba layer: the last d_conv - 1 conv inputs (batch, conv_dim, d_conv - 1) and
    the SSM state (batch, heads, d_state, head_dim) in the scan's compute dtype (float32, or
    float64 for a float64 model). With the conv step inside the SSD step's kernel (the default),
    ``conv_windows`` (2, batch, conv_dim, d_conv - 1) holds the conv inputs instead, for the token
    at slot s in buffer s % 2 (:func:`mambaify.ops.conv_ssd_step_inplace`), and ``conv_state`` is
    None."""

    conv_state: torch.Tensor | None
    ssm_state: torch.Tensor
    conv_windows: torch.Tensor | None = None

    def rows(self, n: int) -> MambaBuffers:
        windows = self.conv_windows[:, :n] if self.conv_windows is not None else None
        conv = self.conv_state[:n] if self.conv_state is not None else None
        return MambaBuffers(conv, self.ssm_state[:n], windows)

    def by_row(self) -> list[torch.Tensor]:
        """Every buffer, as a view with the batch first (the windows' buffer index second)."""
        conv = self.conv_windows.transpose(0, 1) if self.conv_windows is not None else self.conv_state
        return [conv, self.ssm_state]


@dataclass
class StaticCache:
    """One buffer set per layer, plus the left padding of each row of the current request."""

    layers: list[KVBuffers | MambaBuffers]
    pad_lengths: torch.Tensor  # (batch,) long

    def rows(self, n: int) -> StaticCache:
        """The first n rows, as views: same memory, so a graph captured on them sees every update."""
        return StaticCache([layer.rows(n) for layer in self.layers], self.pad_lengths[:n])


# ---------------------------------------------------------------------------------------------
# One forward pass's bookkeeping


@dataclass
class ForwardContext:
    """Where the tokens of one forward pass sit, shared by all its layers.

    query_slots (t,): the cache slots the tokens are written to.
    key_slots (s,): the slots attention reads, 0..s-1: the prompt's in prefill, all in decode.
    mask (batch, 1, t, s) bool: the keys each query may see (before any sliding window); None
    when attention runs the split-K kernel, which applies the same rule from the slots.
    pad_lengths (batch,): each row's first real slot (the left padding comes before it).
    rotary: RoPE (cos, sin) at the tokens' positions; None when no layer is attention.
    padding_mask (batch, t): 1 on real tokens; the Mamba layers' input mask in prefill.
    """

    query_slots: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor | None
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    padding_mask: torch.Tensor | None
    pad_lengths: torch.Tensor | None = None
    _biases: dict = field(default_factory=dict, repr=False)

    def attention_mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window is None:
            return self.mask
        # Within a row the slots of real tokens are consecutive positions, so the slot distance is
        # the position distance that transformers' sliding-window mask compares.
        in_window = self.query_slots[:, None] - self.key_slots[None, :] < sliding_window
        return self.mask & in_window

    def attention_bias(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`attention_mask` as SDPA's additive form, (batch, 1, t, s) in ``dtype``: 0 where a
        key is visible, -inf elsewhere. Built once per pass and window and shared by the layers
        (SDPA would otherwise convert a boolean mask in every layer); the values are those of
        SDPA's own conversion, so the attention is the same."""
        key = (sliding_window, dtype)
        if key not in self._biases:
            mask = self.attention_mask(sliding_window)
            b, _, t, s = mask.shape
            # Rows padded to a multiple of 16 elements: the memory-efficient SDPA kernel copies
            # a mask whose rows are not aligned, in every layer.
            storage = torch.zeros(b, 1, t, -(-s // 16) * 16, dtype=dtype, device=mask.device)
            bias = storage[..., :s]
            self._biases[key] = bias.masked_fill_(~mask, float("-inf"))
        return self._biases[key]


def use_split_k_attention(device: torch.device) -> bool:
    """Whether decode/verify attention runs :func:`mambaify.ops.attention.decode_attention` (the
    Triton split-K kernel on CUDA, which reads only each row's real slots) rather than SDPA over
    a (b,1,t,S) mask; the mask path is the simpler one where no kernel runs."""
    return device.type == "cuda"


def grouped_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, each group of query heads sharing one key/value head.

    The heads of a group are laid along the query axis instead of repeating the keys and values
    per head: the cache is read once per group and every SDPA backend accepts the shapes.
    query (b, h, t, d); keys, values (b, kv_heads, s, d); mask (b, 1, t, s), bool or additive
    -> (b, h, t, d).
    """
    b, h, t, d = query.shape
    kv_heads, s = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    query = query.reshape(b, kv_heads, group * t, d)
    if t > 1:  # one token (decode): its mask row broadcasts over the group's rows as it is
        mask = mask[:, :, None].expand(b, 1, group, t, s).reshape(b, 1, group * t, s)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


# ---------------------------------------------------------------------------------------------
# How the runners call a linear layer

LinearCall = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def module_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's own forward (cuBLAS on CUDA, or whatever inductor makes of it compiled)."""
    return layer(x)


def few_row_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's weights through :func:`mambaify.ops.small_batch_linear`: the split-K Triton
    GEMV on CUDA for at most 16 rows (a decode step at small batch), ``F.linear`` otherwise."""
    return ops.small_batch_linear(x, layer.weight, layer.bias, **scale_operands(layer))


# An RMSNorm the GEMV folds into the projection after it: (weight, eps).
FoldedNorm = tuple[torch.Tensor, float]


def fused_conv_step_default() -> bool:
    """Whether the engine's Mamba decode step runs its conv step inside the SSD step's kernel: one
    launch fewer per Mamba layer and token, the conv window double-buffered. On unless
    MAMBAIFY_FUSED_CONV_STEP=0: on the H200 (session 13, compiled, split-K, norms folded) it took
    the 8B 0% hybrid's batch-1 step from 4.82 to 4.78 ms."""
    return os.environ.get("MAMBAIFY_FUSED_CONV_STEP", "1") != "0"


def fold_norms_default() -> bool:
    """Whether the engines fold each layer's RMSNorms into the split-K GEMVs that follow them and
    the residual adds into the GEMVs before, which removes the two add + norm kernels per layer
    that inductor makes of them. On unless MAMBAIFY_FOLD_NORMS=0: on the H200 (session 13,
    compiled, split-K, batch 1) it took the 8B teacher's step from 4.74 to 4.70 ms and the 0%
    hybrid's from 4.86 to 4.82; the verify call (4 rows, where only the adds fold) stayed at 5.03."""
    return os.environ.get("MAMBAIFY_FOLD_NORMS", "1") != "0"


def foldable_norm(norm: nn.Module) -> FoldedNorm | None:
    """(weight, eps) of a Llama-family RMSNorm (:func:`mambaify.ops.rms_norm`), asked of the module
    itself on a probe: None for any other norm, which then runs as a module."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    probe = torch.linspace(-3.0, 5.0, 2 * weight.shape[0], device=weight.device).reshape(2, -1).to(weight.dtype)
    with torch.no_grad():
        return (weight, eps) if torch.equal(norm(probe), ops.rms_norm(probe, weight, eps)) else None


def prepared_norms_default() -> bool:
    """Whether the engines (with ``fold_norms``) have, at several rows, each residual-add GEMV
    prepare the RMSNorm after it in its own launch (:func:`mambaify.ops.small_batch_linear_prepare_norm`:
    the stream times the norm's weight, and its rows' sums of squares) for the GEMVs after the
    norm, which then run none of it, where the norm otherwise runs as a kernel of its own (at
    several rows the GEMV folds a norm badly: :func:`mambaify.ops.folds_norm`). On unless
    MAMBAIFY_PREPARED_NORMS=0: on the H200 it took the 8B verify call over 4 tokens from 4.77 to
    4.70 ms (session 16) and the 8B 0% hybrid's compiled step at batch 8 from 5.10 to 5.03 ms
    (session 17)."""
    return os.environ.get("MAMBAIFY_PREPARED_NORMS", "1") != "0"


@dataclass(frozen=True)
class PreparedNorm:
    """An RMSNorm whose inputs the GEMV before it prepared: ``parts`` (blocks, rows) its input
    rows' sums of squares, ``eps`` the norm's. The tensor that goes with it into the GEMV after
    the norm is the norm's input times the norm's weight (:class:`PreparedStream`)."""

    parts: torch.Tensor
    eps: float


@dataclass(frozen=True)
class PreparedStream:
    """The residual stream as a residual-add GEMV leaves it with the next RMSNorm prepared:
    ``hidden`` the stream, ``scaled`` it times the norm's weight, ``parts`` (blocks, rows) its
    rows' sums of squares."""

    hidden: torch.Tensor
    scaled: torch.Tensor
    parts: torch.Tensor


@dataclass(frozen=True)
class ResidualThenNorm:
    """The residual of a residual-add GEMV, and the weight of the RMSNorm after it, which that
    GEMV prepares (its result then comes as a :class:`PreparedStream`)."""

    residual: torch.Tensor
    next_norm_weight: torch.Tensor


Residual = torch.Tensor | ResidualThenNorm


def stream_of(hidden: torch.Tensor | PreparedStream) -> torch.Tensor:
    """The residual stream itself, prepared for the next norm or not."""
    return hidden.hidden if isinstance(hidden, PreparedStream) else hidden


def scale_operands(layer: nn.Linear) -> dict:
    """An int8 layer's row scales as the small-batch ops take them (``weight_scale``); nothing for
    a layer of floating-point weights (:mod:`mambaify.generate.quantize`)."""
    scale = weight_scale(layer)
    return {} if scale is None else dict(weight_scale=scale)


def gated_up_scales(mlp: nn.Module) -> dict:
    """The gated MLP's int8 row scales for :func:`mambaify.ops.small_batch_gated_up` (nothing for
    floating-point weights)."""
    gate, up = weight_scale(mlp.gate_proj), weight_scale(mlp.up_proj)
    return {} if gate is None and up is None else dict(gate_scale=gate, up_scale=up)


def norm_operands(norm: FoldedNorm | PreparedNorm | None) -> dict:
    """The small-batch ops' norm arguments for ``norm``: a folded norm's ``norm_weight`` and
    ``norm_eps``, a prepared one's ``norm_parts`` and ``norm_eps``, or none (their default eps),
    which folds no norm."""
    if isinstance(norm, PreparedNorm):
        return dict(norm_weight=None, norm_eps=norm.eps, norm_parts=norm.parts)
    weight, eps = norm if norm is not None else (None, 1e-6)
    return dict(norm_weight=weight, norm_eps=eps, norm_parts=None)


def fused_linear(layer: nn.Linear, x: torch.Tensor, norm: FoldedNorm | PreparedNorm | None = None,
                 residual: Residual | None = None, gate: torch.Tensor | None = None
                 ) -> torch.Tensor | PreparedStream:
    """``[residual +] layer([rms_norm](x))`` through the split-K GEMV, the norm and the residual
    add inside its launch on CUDA (:func:`mambaify.ops.small_batch_linear`); with ``gate`` the
    norm is Mamba2's gated RMSNorm of x * silu(gate). A :class:`ResidualThenNorm` residual: the
    result as a :class:`PreparedStream`, the next norm's inputs prepared in the same launch."""
    if isinstance(residual, ResidualThenNorm):
        if norm is not None or gate is not None:
            raise ValueError("a GEMV that prepares the next norm takes no norm of its own")
        return PreparedStream(*ops.small_batch_linear_prepare_norm(x, layer.weight, layer.bias, residual.residual,
                                                                   residual.next_norm_weight, **scale_operands(layer)))
    return ops.small_batch_linear(x, layer.weight, layer.bias, residual=residual, gate=gate, **scale_operands(layer),
                                  **norm_operands(norm))


def norm_or_fold(x: torch.Tensor | PreparedStream, norm: FoldedNorm | None
                 ) -> tuple[torch.Tensor, FoldedNorm | PreparedNorm | None]:
    """(input, norm) for the GEMV after an RMSNorm that ``fold_norms`` would fold into it: the
    norm's inputs as the GEMV before prepared them (x a :class:`PreparedStream`); else x and the
    norm where the GEMV folds it well (one row, :func:`mambaify.ops.folds_norm`), else the
    normalized x and None, the norm a kernel of its own (inductor's, in a compiled step)."""
    if isinstance(x, PreparedStream):
        return x.scaled, PreparedNorm(x.parts, norm[1])
    if norm is None or ops.folds_norm(x):
        return x, norm
    return ops.rms_norm(x, *norm), None


def normed_linear(linear: LinearCall, layer: nn.Linear, x: torch.Tensor,
                  norm: FoldedNorm | PreparedNorm | None) -> torch.Tensor:
    """An input projection: ``linear(layer, x)``, or with ``norm`` the layer's RMSNorm folded in."""
    return linear(layer, x) if norm is None else fused_linear(layer, x, norm)


def linear_plus(linear: LinearCall, layer: nn.Linear, x: torch.Tensor,
                residual: Residual | None) -> torch.Tensor | PreparedStream:
    """An output projection: ``linear(layer, x)``, or with ``residual`` the residual add folded in
    (and the next norm prepared, with a :class:`ResidualThenNorm`)."""
    return linear(layer, x) if residual is None else fused_linear(layer, x, residual=residual)


def mamba_out_projection(mixer: Mamba2Mixer, y: torch.Tensor, z: torch.Tensor, linear: LinearCall,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """out_proj(norm(y, z)) of a Mamba layer, y and z (b, t, d_inner). With ``residual`` (the
    engines' fold_norms) the gated RMSNorm is folded into out_proj's GEMV, as the layers' RMSNorms
    are into theirs, and the residual added there; otherwise the norm runs as its module."""
    if residual is None:
        return linear(mixer.out_proj, mixer.norm(y, z))
    if not ops.folds_norm(y):
        return fused_linear(mixer.out_proj, mixer.norm(y, z), residual=residual)
    norm = mixer.norm
    return fused_linear(mixer.out_proj, y, (norm.weight, norm.variance_epsilon), residual, gate=z)


# ---------------------------------------------------------------------------------------------
# Token mixers against the static cache


class AttentionRunner:
    """A teacher-family attention module (Llama, Mistral or Qwen2) run against static K/V buffers
    with its own projections and its family's RoPE function. Prefill and decode are one code path:
    write this pass's keys/values at their slots, then attend over the slots the mask allows."""

    def __init__(self, attention: nn.Module, linear: LinearCall = module_linear):
        self.attention = attention
        self.linear = linear
        self.head_dim: int = attention.head_dim
        self.num_kv_heads: int = attention.k_proj.out_features // self.head_dim
        # Qwen2 sets its window per layer; Mistral reads it from the config; Llama has none.
        self.sliding_window: int | None = getattr(
            attention, "sliding_window", getattr(attention.config, "sliding_window", None)
        )
        self.apply_rotary = importlib.import_module(type(attention).__module__).apply_rotary_pos_emb
        # q, k and v in one split-K GEMV launch where the linear layers go through it and the three
        # weights can be read as one; otherwise one call each.
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.grouped_qkv = linear is few_row_linear and ops.qkv_read_as_one(*(p.weight for p in projections))
        # Int8 projections (a quantized draft): their row scales side by side, as the launch reads them.
        scales = [weight_scale(p) for p in projections]
        self.qkv_scales = dict(weight_scale=torch.cat(scales)) if all(s is not None for s in scales) else {}

    def allocate(self, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> KVBuffers:
        shape = (batch, self.num_kv_heads, slots, self.head_dim)
        # Zeros, not empty: masked slots still enter the matmuls, and a NaN there would survive the mask.
        return KVBuffers(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def project(self, hidden: torch.Tensor, norm: FoldedNorm | None = None) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values (b, heads, t, head_dim) of hidden (b, t, d). Through the
        split-K GEMV (``linear`` is :func:`few_row_linear`) the three projections are one launch
        (:func:`mambaify.ops.small_batch_qkv`, ``grouped_qkv``); otherwise each goes through ``linear``.
        ``norm``: hidden is the layer's input before its RMSNorm, folded into the projections."""
        attn = self.attention
        b, t, _ = hidden.shape
        heads = (b, t, -1, self.head_dim)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if self.grouped_qkv:
            qkv = ops.small_batch_qkv(hidden, *(p.weight for p in projections), *(p.bias for p in projections),
                                      **self.qkv_scales, **norm_operands(norm))
            q_end = attn.q_proj.out_features
            k_end = q_end + attn.k_proj.out_features
            outputs = (qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:])
        else:
            outputs = tuple(normed_linear(self.linear, p, hidden, norm) for p in projections)
        query, key, value = (o.view(heads).transpose(1, 2) for o in outputs)
        return query, key, value

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, kv: KVBuffers, norm: FoldedNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's output for hidden (b, t, d); with ``norm`` hidden is the layer's input
        before its RMSNorm, and with ``residual`` the output comes with it added (both folded into
        the GEMVs, for :meth:`DecoderLayerRunner.decode`)."""
        attn = self.attention
        b, t, _ = hidden.shape
        query, key, value = self.project(hidden, norm)
        query, key = self.apply_rotary(query, key, *ctx.rotary)
        kv.keys.index_copy_(2, ctx.query_slots, key)
        kv.values.index_copy_(2, ctx.query_slots, value)
        if ctx.mask is None:
            # Decode on CUDA: split-K over each row's real slots up to the token's own (the rule
            # of the mask, applied from the slots; nothing past the current slot is read).
            out = decode_attention_op(
                query, kv.keys, kv.values, ctx.pad_lengths, ctx.query_slots, attn.scaling, self.sliding_window
            )
            return linear_plus(self.linear, attn.o_proj, out.transpose(1, 2).reshape(b, t, -1), residual)
        readable = ctx.key_slots.shape[0]
        out = grouped_query_attention(
            query,
            kv.keys[:, :, :readable],
            kv.values[:, :, :readable],
            ctx.attention_bias(self.sliding_window, query.dtype),
            attn.scaling,
        )
        return linear_plus(self.linear, attn.o_proj, out.transpose(1, 2).reshape(b, t, -1), residual)

    prefill = decode = forward


class MambaRunner:
    """A :class:`Mamba2Mixer` run against static conv/SSM state: the prompt goes through the
    mixer's own forward (padding masked, chunked scan via ``ops.ssd_scan``), each decoded token
    through one conv-window shift and one recurrence step (``ops.conv_step_inplace`` and
    ``ops.ssd_step_inplace``).

    The decay rate A = -exp(A_log) is kept computed (float32) for the decode step, which would
    otherwise cast and exponentiate A_log in every layer and step; every prefill refreshes it, so
    a request always decodes with the mixer's current parameters.
    """

    def __init__(self, mixer: Mamba2Mixer, linear: LinearCall = module_linear, fused_conv: bool | None = None):
        self.mixer = mixer
        self.linear = linear
        # The conv step inside the SSD step's kernel (one launch instead of two per layer and token).
        self.fused_conv = (fused_conv_step_default() if fused_conv is None else fused_conv) and mixer.d_conv > 1
        with torch.no_grad():
            self.A = mixer.A.clone()

    def allocate(self, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> MambaBuffers:
        m = self.mixer  # the state has one size whatever the number of slots
        window = (2, batch) if self.fused_conv else (batch,)
        conv = torch.zeros(*window, m.conv_dim, m.d_conv - 1, dtype=dtype, device=device)
        return MambaBuffers(
            conv_state=None if self.fused_conv else conv,
            ssm_state=torch.zeros(
                batch, m.num_heads, m.d_state, m.head_dim,
                dtype=torch.promote_types(dtype, torch.float32), device=device,
            ),
            conv_windows=conv if self.fused_conv else None,
        )

    def prefill(self, hidden: torch.Tensor, ctx: ForwardContext, state: MambaBuffers) -> torch.Tensor:
        fresh = MambaLayerCache()  # no state yet: the scan starts from zeros
        with torch.no_grad():
            self.A.copy_(self.mixer.A)
        out = self.mixer(hidden, ctx.padding_mask, None, fresh)
        if state.conv_windows is not None:  # the first decoded token reads the buffer of its slot's parity
            first_decode_slot = ctx.query_slots[-1:] + 1
            window = fresh.conv_state[None].to(state.conv_windows.dtype)
            state.conv_windows.index_copy_(0, first_decode_slot % 2, window)
        else:
            state.conv_state.copy_(fresh.conv_state)
        state.ssm_state.copy_(fresh.ssm_state)
        return out

    def decode(self, hidden: torch.Tensor, ctx: ForwardContext, state: MambaBuffers, norm: FoldedNorm | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """Mamba2Mixer.forward for one token, the state read and written in place (fused kernels
        on CUDA); ``norm`` and ``residual`` folded into in_proj and out_proj as in
        :meth:`AttentionRunner.forward`."""
        m = self.mixer
        b = hidden.shape[0]
        z, xBC, dt = m.split_projection(normed_linear(self.linear, m.in_proj, hidden, norm))
        if state.conv_windows is not None:
            groups = (m.num_xb_heads, m.num_xb_heads, m.num_heads)  # x, B, C (see Mamba2Mixer.split_groups)
            y = ops.conv_ssd_step_inplace(state.ssm_state, state.conv_windows, ctx.query_slots, xBC[:, 0],
                                          m.conv1d.weight[:, 0], m.conv1d.bias, groups, dt[:, 0], self.A, m.D,
                                          m.dt_bias)
            return mamba_out_projection(m, y.reshape(b, 1, m.d_inner), z, self.linear, residual)
        xBC = ops.conv_step_inplace(state.conv_state, xBC[:, 0], m.conv1d.weight[:, 0], m.conv1d.bias)  # SiLU-ed
        # x and B stay per kv head and dt raw: the step reads each head's group and applies the
        # softplus itself, so no kernel copies them out to every head first.
        x, B, C = m.split_groups(xBC)
        y = ops.ssd_step_inplace(state.ssm_state, x, dt[:, 0], self.A, B, C, m.D, dt_bias=m.dt_bias)
        return mamba_out_projection(m, y.reshape(b, 1, m.d_inner), z, self.linear, residual)


def missing_gated_mlp_parts(mlp: nn.Module) -> list[str]:
    """What ``mlp`` lacks of the Llama family's gated MLP, which the split-K path runs itself."""
    return [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]


def check_small_batch_linear(setting) -> None:
    if setting not in (True, False, "auto"):
        raise ValueError(f"small_batch_linear must be True, False or 'auto', got {setting!r}")


def resolve_small_batch_linear(setting: bool | Literal["auto"], model: nn.Module | None, device: torch.device) -> bool:
    """Whether an engine runs its linear layers through the split-K GEMV. "auto" (the engines'
    default): on CUDA where mambaify's Triton kernels import and every layer of ``model`` (None:
    not built yet, not checked) has the Llama family's gated MLP. On the H200 it was as fast as
    cuBLAS or faster at every point measured (BENCHMARKS.md, sessions 8-11: the 8B step 5-7%
    faster at batch 1 and equal at batch 8; SmolLM2's compiled engine 16% faster at batch 1, its
    speculative rounds 20%)."""
    check_small_batch_linear(setting)
    if setting != "auto":
        return setting
    if not ops.gpu_kernels_available(device):
        return False
    return model is None or not any(missing_gated_mlp_parts(layer.mlp) for layer in model.model.layers)


class DecoderLayerRunner:
    """A decoder layer (the hybrid's or the teacher's): norm, token mixer, residual, norm, MLP, residual.

    With a ``linear`` other than the modules' own, the MLP is run here from its gate, up and down
    projections (the gated MLP of the Llama family: down(act(gate(x)) * up(x))), gate and up as
    one :func:`mambaify.ops.small_batch_gated_up` call where the activation is SiLU.

    ``fold_norms`` (with the split-K GEMV, both norms the Llama family's RMSNorm): the decode
    step runs no norm or residual add of its own. Each norm is folded into the projections after
    it (q/k/v or in_proj; gate and up), each residual add into the projection before it (o_proj or
    out_proj; down), so a layer's only kernels outside the mixer are its GEMVs."""

    def __init__(self, layer: nn.Module, linear: LinearCall = module_linear, fold_norms: bool = False):
        self.layer = layer
        self.linear = linear
        mamba = getattr(layer, "mamba", None)
        if isinstance(mamba, Mamba2Mixer):
            self.mixer = MambaRunner(mamba, linear)
        else:
            self.mixer = AttentionRunner(layer.self_attn, linear)
        self.swiglu = False
        if linear is not module_linear:
            mlp = layer.mlp
            missing = missing_gated_mlp_parts(mlp)
            if missing:
                raise ValueError(
                    f"small_batch_linear needs the Llama family's gated MLP; {type(mlp).__name__} has no "
                    f"{', '.join(missing)}: leave small_batch_linear off for this model")
            # SiLU without biases (the family's usual MLP): gate and up go through one fused call.
            # The activation is asked what it computes: families name their SiLU modules differently.
            probe = torch.linspace(-8.0, 8.0, 65)
            self.swiglu = (mlp.gate_proj.bias is None and mlp.up_proj.bias is None
                           and torch.equal(mlp.act_fn(probe), F.silu(probe)))
        self.folded_norms: tuple[FoldedNorm, FoldedNorm] | None = None
        if fold_norms and linear is few_row_linear:
            norms = (foldable_norm(layer.input_layernorm), foldable_norm(layer.post_attention_layernorm))
            if None not in norms:
                self.folded_norms = norms
        # With folded norms (and MAMBAIFY_PREPARED_NORMS not 0): the norm after the layer (the next
        # layer's input norm, or the final one; set by the stack) prepared by its down projection.
        self.prepare_norms = self.folded_norms is not None and prepared_norms_default()
        self.next_norm: FoldedNorm | None = None

    def allocate(self, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> KVBuffers | MambaBuffers:
        return self.mixer.allocate(batch, slots, dtype, device)

    def prefill(self, hidden: torch.Tensor, ctx: ForwardContext, buffers) -> torch.Tensor:
        return self._run(self.mixer.prefill, hidden, ctx, buffers)

    def decode(self, hidden: torch.Tensor, ctx: ForwardContext, buffers) -> torch.Tensor:
        if self.folded_norms is None:
            return self._run(self.mixer.decode, hidden, ctx, buffers)
        return self.run_folded(lambda x, norm, residual: self.mixer.decode(x, ctx, buffers, norm, residual), hidden)

    def run_folded(self, mix: Callable, hidden: torch.Tensor | PreparedStream) -> torch.Tensor | PreparedStream:
        """The layer with ``fold_norms``: each residual add inside the GEMV before it and each norm
        inside the GEMVs after it, or run first where they fold it badly (:func:`norm_or_fold`),
        or with ``prepare_norms`` at several rows prepared by the GEMV before it (its result, and
        the layer's input, then a :class:`PreparedStream`; :meth:`residual_before`).
        ``mix(x, norm, residual)``: the token mixer's output with the residual added."""
        before_mixer, before_mlp = self.folded_norms
        hidden = mix(*norm_or_fold(hidden, before_mixer), self.residual_before(stream_of(hidden), before_mlp))
        residual = self.residual_before(stream_of(hidden), self.next_norm)
        return self.mlp(*norm_or_fold(hidden, before_mlp), residual=residual)

    def residual_before(self, stream: torch.Tensor, norm: FoldedNorm | None) -> Residual:
        """The residual to add in the GEMV before ``norm``: with ``prepare_norms``, at several rows
        (where the GEMV after the norm would not fold it, and the GEMV runs: ops.prepares_norm),
        the norm prepared there as well."""
        if not self.prepare_norms or norm is None or not ops.prepares_norm(stream):
            return stream
        return ResidualThenNorm(stream, norm[0])

    def _run(self, mix: Callable, hidden: torch.Tensor, ctx: ForwardContext, buffers) -> torch.Tensor:
        layer = self.layer
        hidden = hidden + mix(layer.input_layernorm(hidden), ctx, buffers)
        return hidden + self.mlp(layer.post_attention_layernorm(hidden))

    def mlp(self, x: torch.Tensor, norm: FoldedNorm | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's MLP, its projections through ``linear``; with ``norm`` x is the input of the
        layer's post-attention RMSNorm and with ``residual`` the result comes with it added, both
        folded into the GEMVs (``fold_norms``)."""
        mlp, linear = self.layer.mlp, self.linear
        if norm is None and residual is None:
            if linear is module_linear:
                return mlp(x)
            if self.swiglu:  # gate and up read in one pass, SiLU applied as their sums finish
                return linear(mlp.down_proj, ops.small_batch_gated_up(x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                                                      **gated_up_scales(mlp)))
            return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))
        if self.swiglu:
            hidden = ops.small_batch_gated_up(x, mlp.gate_proj.weight, mlp.up_proj.weight, **gated_up_scales(mlp),
                                              **norm_operands(norm))
        else:
            hidden = mlp.act_fn(normed_linear(linear, mlp.gate_proj, x, norm)) * normed_linear(linear, mlp.up_proj, x, norm)
        return linear_plus(linear, mlp.down_proj, hidden, residual)


# ---------------------------------------------------------------------------------------------
# The whole model


class DecodingStack:
    """A causal LM's modules run against a :class:`StaticCache`: a prefill over a left-padded
    prompt batch, and a decode step of one token per row.

    rope_table (num_slots, 2, rotary_dim): RoPE's (cos, sin) at every position a slot can hold,
    computed once by the model's own rotary embedding, in the model's dtype; a pass gathers its
    rows instead of recomputing them (the same values: each position's are computed alone). None
    without attention layers, or for a RoPE that depends on the positions seen (dynamic, long).
    """

    def __init__(self, model: nn.Module, num_slots: int, linear: LinearCall = module_linear,
                 fold_norms: bool = False):
        base = model.model
        self.embed_tokens, self.norm, self.rotary_emb = base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        self.linear = linear
        self.layers = [DecoderLayerRunner(layer, linear, fold_norms) for layer in base.layers]
        # The final norm folded into the LM head's GEMV, where the layers' norms are.
        self.folded_norm = foldable_norm(self.norm) if fold_norms and linear is few_row_linear else None
        # Each layer's next norm, for a layer that prepares it: the next layer's input norm where
        # that layer folds its norms, the final norm after the last layer.
        for runner, following in zip(self.layers, [*self.layers[1:], None]):
            if following is None:
                runner.next_norm = self.folded_norm
            elif following.folded_norms is not None:
                runner.next_norm = following.folded_norms[0]
        self.has_attention = any(isinstance(r.mixer, AttentionRunner) for r in self.layers)
        self.num_slots = num_slots
        self.slot_range = torch.arange(num_slots, device=self.lm_head.weight.device)
        self.rope_table = self._rope_table() if self.has_attention and _rope_is_static(self.rotary_emb) else None

    def _rope_table(self) -> torch.Tensor:
        weight = self.lm_head.weight  # the rotary embedding reads only its device and dtype
        cos, sin = self.rotary_emb(weight.new_empty(0), self.slot_range[None])
        return torch.stack([cos[0], sin[0]], dim=1)

    def allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> StaticCache:
        layers = [runner.allocate(batch, self.num_slots, dtype, device) for runner in self.layers]
        return StaticCache(layers, torch.zeros(batch, dtype=torch.long, device=device))

    def context(
        self,
        hidden: torch.Tensor,
        query_slots: torch.Tensor,
        num_key_slots: int,
        pad_lengths: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        split_k: bool = False,
    ) -> ForwardContext:
        keys = self.slot_range[:num_key_slots]
        mask = None
        if not split_k:
            causal = keys[None, :] <= query_slots[:, None]  # (t, s)
            own = keys[None, :] == query_slots[:, None]
            real = keys[None, None, :] >= pad_lengths[:, None, None]  # (b, 1, s)
            # A query on a padding slot sees only itself: a row with no key at all would make NaNs,
            # and no real token ever attends to a padding slot.
            mask = (causal & (real | own))[:, None]
        rotary = None
        if self.has_attention:
            positions = (query_slots[None, :] - pad_lengths[:, None]).clamp(min=0)
            if self.rope_table is None:
                rotary = self.rotary_emb(hidden, positions)
            else:
                table = self.rope_table[positions]  # (b, t, 2, rotary_dim)
                rotary = (table[:, :, 0], table[:, :, 1])
        return ForwardContext(query_slots, keys, mask, rotary, padding_mask, pad_lengths)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: StaticCache, logits_to_keep: int = 1
    ) -> torch.Tensor:
        """Run the prompt batch (left-padded) from slot 0 and leave its state in the cache.
        Returns the logits of the last ``logits_to_keep`` positions (0: all), (b, kept, vocab)."""
        t = input_ids.shape[1]
        cache.pad_lengths.copy_((attention_mask == 0).sum(dim=-1))
        hidden = self.embed_tokens(input_ids)
        ctx = self.context(hidden, self.slot_range[:t], t, cache.pad_lengths, attention_mask)
        for runner, buffers in zip(self.layers, cache.layers):
            hidden = runner.prefill(hidden, ctx, buffers)
        return self.linear(self.lm_head, self.norm(hidden[:, -logits_to_keep:]))

    def decode(self, token_ids: torch.Tensor, slot: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """One token per row, token_ids (b, 1), written at ``slot`` (a (1,) tensor) -> logits (b, vocab).
        Fixed shapes and no host reads: the step a CUDA graph captures."""
        hidden = self.embed_tokens(token_ids)
        split_k = use_split_k_attention(hidden.device)
        ctx = self.context(hidden, slot, self.num_slots, cache.pad_lengths, split_k=split_k)
        for runner, buffers in zip(self.layers, cache.layers):
            hidden = runner.decode(hidden, ctx, buffers)
        return self.logits(hidden)[:, 0]

    def logits(self, hidden: torch.Tensor | PreparedStream) -> torch.Tensor:
        """The LM head over the final norm of ``hidden`` (the norm folded into its GEMV with
        ``fold_norms``, or prepared by the last layer's down projection)."""
        if self.folded_norm is not None:
            return fused_linear(self.lm_head, *norm_or_fold(hidden, self.folded_norm))
        return self.linear(self.lm_head, self.norm(hidden))


# ---------------------------------------------------------------------------------------------
# Running the decode step: eagerly, or by replaying a CUDA graph


@dataclass
class DecodeInputs:
    """The decode step's input buffers: token_ids (b, 1) and the slot to write (1,)."""

    token_ids: torch.Tensor
    slot: torch.Tensor


# A decode step returns the logits (b, vocab) and each row's greedy token (b,), or None where
# the caller takes the argmax itself.
StepOutput = tuple[torch.Tensor, torch.Tensor | None]


class EagerDecoder:
    """Runs the decode step as ordinary PyTorch calls (or a compiled step's: ``compiled``).
    After a call, ``greedy`` holds the step's greedy tokens if it computed them."""

    def __init__(self, step: Callable[[], StepOutput], inputs: DecodeInputs, compiled: bool = False):
        self.step = step
        self.inputs = inputs
        self.compiled = compiled
        self.greedy: torch.Tensor | None = None

    def load(self, token_ids: torch.Tensor, slot: int) -> None:
        self.inputs.token_ids.copy_(token_ids[:, None])
        self.inputs.slot.fill_(slot)

    def __call__(self, token_ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.load(token_ids, slot)
        logits, self.greedy = self.step()
        return logits


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message``, for warnings and the ``*_error`` attributes."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def capture_cuda_graph(fn: Callable[[], Any], warmup_steps: int = 2, pool=None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup_steps`` times on a side stream, then capture one call of it in a CUDA
    graph (in ``pool`` if given). Returns the graph and what the captured call returned, which
    lives in the graph's pool and is overwritten by each replay.

    The warm-up does the lazy initialisation (cuBLAS workspaces, Triton compiles and autotuning)
    that must not happen during capture, on a side stream as PyTorch's CUDA-graph notes prescribe;
    it runs ``fn`` for real, so it writes whatever ``fn`` writes.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


class CUDAGraphDecoder(EagerDecoder):
    """Captures the decode step once and replays it: one launch per token instead of one per kernel.

    The graph reads the input buffers, the cache and the request's pad lengths at fixed addresses
    and writes its logits to one output buffer, which the next replay overwrites. Warming up runs
    the step for real, writing into the cache: capture before the request's prefill.
    """

    def __init__(
        self, step: Callable[[], StepOutput], inputs: DecodeInputs, warmup_steps: int = 2, compiled: bool = False
    ):
        super().__init__(step, inputs, compiled)
        self.graph, (self.logits, self.greedy) = capture_cuda_graph(step, warmup_steps)

    def __call__(self, token_ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.load(token_ids, slot)
        self.graph.replay()
        return self.logits


def fast_path_enabled(name: str) -> bool:
    """False where the environment variable ``name`` is "0": a switch to turn one of the engines'
    CUDA-side fast paths off without touching code (MAMBAIFY_PREFILL_GRAPHS: graphed prefills;
    MAMBAIFY_LAUNCH_AHEAD: the speculative engine's rounds launched ahead; MAMBAIFY_LATE_STOP_CHECK:
    the plain engine's late stop check)."""
    return os.environ.get(name, "1") != "0"


# Prompt widths whose prefill a CUDA graph replays: a prompt is left-padded up to the next one
# (padding is masked, so the result is the unpadded prompt's), if the request leaves room for it
# and the batch holds at most PREFILL_GRAPH_TOKENS tokens. Longer prompts prefill eagerly.
PREFILL_GRAPH_WIDTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
PREFILL_GRAPH_TOKENS = 4096


# Cache slots past max_length for the padding of a short prompt up to its graphed width: without
# them an engine sized exactly to its requests (prompt + max_new_tokens = max_length) would leave
# no room for any padding and prefill every prompt eagerly (about 45 ms for SmolLM2 on the H200,
# against 5 ms from a graph: session 8 found every timed request of bench_speculative doing so).
# With 128 more slots, any prompt of up to 256 tokens fits its width, whatever max_length is.
PREFILL_PAD_SLOTS = 128


def pad_slots_for(device: torch.device, use_cuda_graph: bool | str, setting: int | None = None) -> int:
    """The cache slots an engine adds to max_length for its prefills' padding: ``setting`` where
    given, else PREFILL_PAD_SLOTS where the engine may graph its prefills, 0 where it never does."""
    if setting is not None:
        if setting < 0:
            raise ValueError(f"prefill_pad_slots must be >= 0, got {setting}")
        return setting
    graphs = device.type == "cuda" and use_cuda_graph is not False and fast_path_enabled("MAMBAIFY_PREFILL_GRAPHS")
    return PREFILL_PAD_SLOTS if graphs else 0


def prefill_width(widths: Sequence[int] | None, batch: int, width: int, room: int) -> int | None:
    """The width of ``widths`` that a (batch, width) prompt is padded to (at most ``room``), or None."""
    for bucket in widths or ():
        if bucket >= width:
            return bucket if bucket <= room and batch * bucket <= PREFILL_GRAPH_TOKENS else None
    return None


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, pad_id: int):
    """A left-padded batch widened to ``width`` with more left padding."""
    extra = width - input_ids.shape[1]
    return F.pad(input_ids, (extra, 0), value=pad_id), F.pad(attention_mask, (extra, 0), value=0)


class GraphedPrefill:
    """A prefill of one (rows, width) shape captured once and replayed.

    Eager, a prefill of a short prompt costs what its hundreds of kernel launches cost (about
    45 ms for SmolLM2's 30 layers on the H200, whatever the prompt's length up to 1k tokens);
    replayed from a graph, one launch. ``run(input_ids, attention_mask)`` must read only its two
    arguments and persistent buffers (the cache) and write its results into the cache; what it
    returns lives in the graph's pool until the next replay. Warming up runs it for real on the
    cache rows it fills: capture right before the prefill that uses it.
    """

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor, warmup_steps: int = 2):
        self.input_ids, self.attention_mask = input_ids.clone(), attention_mask.clone()
        self.graph, self.output = capture_cuda_graph(lambda: run(self.input_ids, self.attention_mask), warmup_steps)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        self.input_ids.copy_(input_ids)
        self.attention_mask.copy_(attention_mask)
        self.graph.replay()
        return self.output


class StopWatch:
    """Tells the generation loop when every row has stopped, without making the host wait for
    the step it has just launched.

    Reading ``running.any()`` at once would block the host until the GPU finishes each step, so
    the host could never queue the next replay while the current one runs: every step would pay
    the host's own time (sampling launches, Python) on top of the GPU's. Instead each step's flag
    is copied to pinned host memory behind an event and read ``lag`` steps later (or sooner, once
    its event has completed). The loop may therefore run up to ``lag`` steps after every row has
    stopped; those steps emit only padding, and :meth:`Engine.generate` drops them. ``lag`` 0
    reads each flag at once (what streaming needs anyway). On the CPU, where every call is
    synchronous, a flag is read exactly ``lag`` steps late, which tests the bookkeeping.
    """

    def __init__(self, device: torch.device, lag: int):
        if lag < 0:
            raise ValueError(f"the stop check's lag must be >= 0, got {lag}")
        self.lag = lag
        self.cuda = device.type == "cuda"
        # A ring of lag + 1 slots: a slot is reused only after the flag it held has been read.
        self.flags = torch.empty(lag + 1, dtype=torch.bool, pin_memory=self.cuda and lag > 0)
        self.events = [torch.cuda.Event() for _ in range(lag + 1)] if self.cuda and lag > 0 else []
        self.pending: deque[int] = deque()
        self.steps = 0

    def all_stopped(self, running: torch.Tensor) -> bool:
        """Record this step's ``running`` (batch,) bool; True once a recorded step had no row running."""
        if self.lag == 0:
            return not bool(running.any())
        slot = self.steps % (self.lag + 1)
        self.steps += 1
        self.flags[slot].copy_(running.any(), non_blocking=True)
        if self.cuda:
            self.events[slot].record()
        self.pending.append(slot)
        while self.pending:
            oldest = self.pending[0]
            if len(self.pending) > self.lag:
                if self.cuda:
                    self.events[oldest].synchronize()  # lag steps old: the GPU is still busy with newer ones
            elif not (self.cuda and self.events[oldest].query()):
                break
            self.pending.popleft()
            if not bool(self.flags[oldest]):
                return True
        return False


# How many steps the host may run ahead of the stop-token check on CUDA (see StopWatch).
STOP_CHECK_LAG = 4


# ---------------------------------------------------------------------------------------------
# Compiling the decode step

# Inductor modes without CUDA graphs of inductor's own: the engine captures the compiled step in
# its graph, and a graph cannot be captured inside another's capture.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Dynamo keeps a cache of compiled entries per code object, 8 by default. Every engine and batch
# size compiles the same code object (the step closure of Engine._make_decoder), each a
# legitimate entry: allow many rather than silently running the 9th eagerly.
_RECOMPILE_LIMIT = 1024


class CompileError(RuntimeError):
    """torch.compile could not compile (or capture) the decode step; Engine(compile=False) avoids it."""


def check_compile_options(compile, compile_mode: str) -> None:
    """Raise a ValueError unless ``compile`` is True, False or "auto" and ``compile_mode`` one of
    :data:`COMPILE_MODES` (the engines' settings)."""
    if compile not in (True, False, "auto") or compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"compile takes True, False or 'auto' and compile_mode one of {', '.join(COMPILE_MODES)}; "
            f"got {compile!r} and {compile_mode!r}"
        )


def compile_steps(engine, steps: Sequence[Callable]) -> list[Callable]:
    """:func:`compile_step` each of ``steps`` in ``engine.compile_mode``, adding the time spent
    (their first runs included, synchronised on CUDA) to ``engine.compile_seconds``; for the
    Engine's decode step and the SpeculativeEngine's rounds alike."""
    start = time.perf_counter()
    try:
        compiled = [compile_step(step, engine.compile_mode) for step in steps]
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    finally:
        engine.compile_seconds += time.perf_counter() - start
    return compiled


def compile_failed(engine, err: Exception, what: str) -> None:
    """Compiling ``what`` failed with ``err`` (dynamo, inductor, or capturing the compiled code):
    raise :class:`CompileError` where ``compile=True`` insisted, otherwise turn compiling off on
    ``engine`` (``compile_error`` says why) with a warning, and the caller goes on eagerly."""
    reason = error_summary(err)
    if engine.compile_setting is True:
        raise CompileError(f"compiling {what} failed ({reason}); use compile=False") from err
    engine.compile, engine.compile_error = False, reason
    logger.warning("compiling %s failed (%s); decoding without torch.compile", what, reason)


def _patch_config(module, **values):
    # Options that this torch may not have yet are left out.
    return module.patch(**{name: value for name, value in values.items() if hasattr(module, name)})


def _pdl_options(inductor_config) -> dict:
    """Inductor's programmatic dependent launch where it is on (:func:`mambaify.ops.pdl_enabled`)
    and this torch offers it."""
    return {"triton.enable_pdl": True} if ops.pdl_enabled() and hasattr(inductor_config.triton, "enable_pdl") else {}


def compile_step(step: Callable[[], torch.Tensor], mode: str = "default") -> Callable[[], torch.Tensor]:
    """Compile a fixed-shape step with torch.compile, run it once (that compiles it) and return a
    callable that runs the compiled code and raises rather than recompiling.

    fullgraph: a graph break is an error, not a silent split; dynamic=False: specialised to the
    step's shapes (one compile per batch size); ``mode`` one of :data:`COMPILE_MODES`. Inductor
    rounds low-precision intermediates where eager rounds them (emulate_precision_casts), so the
    compiled step computes what the eager one does, up to the order of float32 reductions. The
    first call writes into whatever the step writes (the cache): compile before a prefill, as
    the CUDA-graph capture does. Call the result under the grad mode of the first call.
    MAMBAIFY_PDL=1: inductor's kernels launch as programmatic dependent launches (:func:`_pdl_options`).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r} (modes with inductor's "
            "own CUDA graphs cannot run inside the engine's graph)"
        )
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    limits = dict(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT)
    with _patch_config(dynamo_config, **limits), _patch_config(inductor_config, emulate_precision_casts=True), \
            inductor_config.patch(_pdl_options(inductor_config)):
        compiled()

    def run() -> torch.Tensor:
        # The engine's calls meet the guards of the first call (same tensors, same shapes); a
        # recompile would mean something changed under the step, so it is an error.
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled()

    return run


def _rope_is_static(rotary_emb: nn.Module) -> bool:
    # Dynamic and long RoPE recompute their frequencies from the positions seen, on the host.
    rope_type = str(getattr(rotary_emb, "rope_type", "default"))
    return "dynamic" not in rope_type and "longrope" not in rope_type


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Request:
    """The request the cache holds: its rows, its decoder and the slot the next token goes to."""

    batch_size: int
    decoder: EagerDecoder
    next_slot: int


def _token_ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class GenerationFrontend:
    """The request-facing half an engine shares with the speculative one: prompt batching and
    checks, stop and pad tokens, and text in / text out over a tokenizer.

    A subclass sets ``model``, ``tokenizer``, ``device``, ``max_batch_size``, ``max_length``,
    ``stop_token_ids`` and ``pad_token_id`` (see :meth:`_special_tokens`) and provides
    ``stream(prompts, **options)`` (one list of each row's token, or None, per step) and
    ``generate(prompts, **options)`` (batch, steps).
    """

    # --- short prompts prefilled from CUDA graphs (see GraphedPrefill) ------------------------

    def _init_prefill_graphs(self) -> None:
        """After ``use_cuda_graph`` is set: generate() / stream() pad short prompts to
        ``prefill_widths`` and replay their prefill from a CUDA graph (None: every prompt is
        prefilled as it comes); ``prefill_error`` says why capturing failed, if it did."""
        graphs = self.use_cuda_graph and fast_path_enabled("MAMBAIFY_PREFILL_GRAPHS")
        self.prefill_widths: tuple[int, ...] | None = PREFILL_GRAPH_WIDTHS if graphs else None
        self.prefill_error: str | None = None
        self._prefill_graphs: dict[tuple, GraphedPrefill] = {}
        # generate()'s prefills so far, from a graph or not: a benchmark checks that what it
        # times ran the path it means to time.
        self.prefill_counts = {"graphed": 0, "eager": 0}

    def prefill_bucket(self, batch: int, width: int, max_new_tokens: int) -> int | None:
        """The graphed width generate() pads a (batch, width) prompt to, or None (an eager
        prefill); counted in ``prefill_counts``. The padding may use the cache's slots past
        max_length (``pad_slots``)."""
        room = self.max_length + self.pad_slots - max_new_tokens
        bucket = prefill_width(self.prefill_widths, batch, width, room)
        graphed = bucket is not None and self.use_cuda_graph and self.prefill_error is None
        self.prefill_counts["graphed" if graphed else "eager"] += 1
        return bucket

    def graphed_prefill(self, key: tuple, run: Callable, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Run ``run(input_ids, attention_mask)`` from the graph kept under ``key`` (captured now
        if new), or eagerly where this engine does not graph its prefills (the CPU, or a capture
        that failed: then a warning, ``prefill_error``, and eager prefills from then on)."""
        if self.use_cuda_graph and self.prefill_error is None:
            graph = self._prefill_graphs.get(key)
            if graph is None:
                try:
                    graph = self._prefill_graphs[key] = GraphedPrefill(run, input_ids, attention_mask)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:
                    self.prefill_error = error_summary(err)
                    logger.warning("capturing the prefill in a CUDA graph failed (%s); prefilling eagerly",
                                   self.prefill_error)
            if graph is not None:
                return graph(input_ids, attention_mask)
        return run(input_ids, attention_mask)

    def _special_tokens(self) -> tuple[list[int], int]:
        """Stop ids: the generation config's eos (else the config's), plus the tokenizer's eos.
        Pad id: the generation config's, the config's or the tokenizer's, else the first stop id."""
        generation = getattr(self.model, "generation_config", None)
        config = self.model.config
        stop = _token_ids(getattr(generation, "eos_token_id", None)) or _token_ids(
            getattr(config, "eos_token_id", None)
        )
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tokenizer_eos is not None and tokenizer_eos not in stop:
            stop.append(tokenizer_eos)
        pads = [
            getattr(generation, "pad_token_id", None),
            getattr(config, "pad_token_id", None),
            getattr(self.tokenizer, "pad_token_id", None),
        ]
        pad = next((p for p in pads if p is not None), stop[0] if stop else 0)
        return stop, int(pad)

    def _stop_ids(self, given: int | Sequence[int] | None) -> list[int]:
        return _token_ids(given) if given is not None else self.stop_token_ids

    def _batch(self, prompts: Prompts, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as a left-padded (ids, mask) pair on the engine's device, checked."""
        if isinstance(prompts, torch.Tensor):
            input_ids = prompts.to(self.device)
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (batch, width) with width >= 1, got {tuple(input_ids.shape)}")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
            if mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
                )
            if not bool((mask[:, 1:] >= mask[:, :-1]).all() & mask[:, -1].bool().all()):
                raise ValueError(
                    "the engine needs left padding (each attention_mask row zeros, then ones, ending "
                    "with a real token); tokenize with padding_side='left'"
                )
        else:
            rows = [list(p) for p in prompts]
            if not rows or not all(rows):
                raise ValueError("give at least one prompt, and at least one token in each")
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if input_ids.shape[0] > self.max_batch_size:
            raise ValueError(f"{input_ids.shape[0]} prompts exceed the engine's max_batch_size={self.max_batch_size}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"prompt width {input_ids.shape[1]} exceeds the engine's max_length={self.max_length}")
        return input_ids, mask.long()

    # --- text in, text out ----------------------------------------------------------------

    def generate_text(self, prompts: str | Sequence[str], **options) -> str | list[str]:
        """Complete each prompt; the reply text stops before the stop token. Options as for generate()."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.generate([self._encode(text) for text in texts], **options)
        stop = set(self._stop_ids(options.get("stop_token_ids")))
        replies = [self._decode_reply(row, stop) for row in tokens.tolist()]
        return replies[0] if isinstance(prompts, str) else replies

    def stream_text(self, prompt: str, **options) -> Iterator[str]:
        """Complete one prompt, yielding the text as it comes. Options as for generate()."""
        return self._stream_reply(self._encode(prompt), options)

    def chat(self, messages: Sequence[dict], **options) -> str:
        """The assistant's reply to a conversation [{"role": ..., "content": ...}, ...]."""
        return "".join(self.stream_chat(messages, **options))

    def stream_chat(self, messages: Sequence[dict], **options) -> Iterator[str]:
        """The assistant's reply to a conversation, yielded as it comes (the tokenizer's chat template)."""
        tokenizer = self._need_tokenizer()
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # The template writes the special tokens itself (BOS included).
        return self._stream_reply(tokenizer(text, add_special_tokens=False)["input_ids"], options)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("text in and out needs a tokenizer: Engine(model, tokenizer)")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self._need_tokenizer()(text)["input_ids"]

    def _decode_reply(self, tokens: list[int], stop: set[int]) -> str:
        end = next((i for i, token in enumerate(tokens) if token in stop), len(tokens))
        return self._need_tokenizer().decode(tokens[:end], skip_special_tokens=True)

    def _stream_reply(self, prompt_ids: list[int], options: dict) -> Iterator[str]:
        tokenizer = self._need_tokenizer()
        stop = set(self._stop_ids(options.get("stop_token_ids")))
        reply: list[int] = []
        shown = ""
        for (token,) in self.stream([prompt_ids], **options):
            if token in stop:
                continue
            reply.append(token)
            text = tokenizer.decode(reply, skip_special_tokens=True)
            # A byte-level token can end inside a multi-byte character: wait for the rest of it.
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        rest = tokenizer.decode(reply, skip_special_tokens=True)[len(shown):]
        if rest:
            yield rest


class Engine(GenerationFrontend):
    """Batched prefill + decode over static caches, for a hybrid or a Llama-family causal LM.

    Engine(model, tokenizer=None, max_batch_size=8, max_length=2048) allocates, once, for every
    attention layer a K/V buffer (max_batch_size, kv_heads, max_length + pad_slots, head_dim) and
    for every Mamba layer a conv state (max_batch_size, conv_dim, d_conv - 1) and an SSM state
    (max_batch_size, heads, d_state, head_dim) in float32. A request holds at most max_batch_size
    prompts, and prompt width + max_new_tokens <= max_length.

    prefill_pad_slots: the K/V slots past max_length (``pad_slots``) that a short prompt's padding
    up to a graphed prefill width may take; None: :data:`PREFILL_PAD_SLOTS` where prefills may be
    graphed (CUDA), else 0. ``prefill_counts`` counts generate()'s prefills, graphed or eager.

    device / dtype: move / cast the model (in place) first; None keeps the model's.
    use_cuda_graph: "auto" replays a captured decode step on CUDA (one capture per batch size,
    made at the first request of that size); True insists; False always runs eagerly.
    compile: compile the decode step with torch.compile (:func:`compile_step`; one compile per
    batch size, at the first request of that size, before its CUDA-graph capture). True insists
    (a failure raises :class:`CompileError`); "auto" compiles on CUDA and falls back to the
    eager step, with a warning and ``compile_error`` set, where compilation fails; False (the
    default) never compiles. ``compile_seconds`` adds up the time spent compiling;
    :meth:`is_compiled` says whether a batch size's step runs compiled.
    compile_mode: the inductor mode, one of :data:`COMPILE_MODES`.
    small_batch_linear: run every linear layer through :func:`mambaify.ops.small_batch_linear`
    (on CUDA the split-K Triton GEMV for requests of at most 16 rows) instead of the modules' own
    forward. "auto" (the default) does on CUDA for the Llama family's gated MLPs
    (:func:`resolve_small_batch_linear`); True insists, False keeps the modules' forward.
    The attribute holds the resolved choice.
    fold_norms: with the split-K GEMV, fold every RMSNorm of the decode step into the GEMV after
    it and every residual add into the GEMV before it (:class:`DecoderLayerRunner`); None (the
    default): :func:`fold_norms_default`, the MAMBAIFY_FOLD_NORMS switch (on unless set to 0).
    stop_check_lag (attribute): how many steps :meth:`generate` may run past the step where the
    last row stopped, so that the host never waits for the step in flight (:class:`StopWatch`;
    :data:`STOP_CHECK_LAG` on CUDA, 0 on the CPU). Streams check every step.

    One request at a time: a new prefill ends the previous request, and a stream of the previous
    request raises if it is resumed after that.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        max_batch_size: int = 8,
        max_length: int = 2048,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        use_cuda_graph: bool | Literal["auto"] = "auto",
        compile: bool | Literal["auto"] = False,
        compile_mode: str = "default",
        small_batch_linear: bool | Literal["auto"] = "auto",
        prefill_pad_slots: int | None = None,
        fold_norms: bool | None = None,
    ):
        if max_batch_size < 1 or max_length < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_length >= 2, got {max_batch_size} and {max_length}")
        check_compile_options(compile, compile_mode)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.pad_slots = pad_slots_for(self.device, use_cuda_graph, prefill_pad_slots)

        self.small_batch_linear = small_batch_linear = resolve_small_batch_linear(small_batch_linear, model, self.device)
        self.stack = DecodingStack(model, num_slots=max_length + self.pad_slots,
                                   linear=few_row_linear if small_batch_linear else module_linear,
                                   fold_norms=fold_norms_default() if fold_norms is None else fold_norms)
        self.cache = self.stack.allocate(max_batch_size, self.dtype, self.device)
        self.inputs = DecodeInputs(
            token_ids=torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device),
            slot=torch.zeros(1, dtype=torch.long, device=self.device),
        )
        self.use_cuda_graph = self._resolve_cuda_graph(use_cuda_graph)
        self.compile_setting = compile
        self.compile = self.device.type == "cuda" if compile == "auto" else bool(compile)
        self.compile_mode = compile_mode
        self.compile_error: str | None = None
        self.compile_seconds = 0.0
        self._decoders: dict[int, EagerDecoder] = {}
        self._request: _Request | None = None
        self.stop_token_ids, self.pad_token_id = self._special_tokens()
        cuda = self.device.type == "cuda"
        self.stop_check_lag = STOP_CHECK_LAG if cuda and fast_path_enabled("MAMBAIFY_LATE_STOP_CHECK") else 0
        self._init_prefill_graphs()

    def _resolve_cuda_graph(self, setting: bool | Literal["auto"]) -> bool:
        capturable = self.device.type == "cuda" and _rope_is_static(self.stack.rotary_emb)
        if setting == "auto":
            return capturable
        if setting and not capturable:
            raise ValueError("CUDA graphs need a CUDA device and a RoPE that does not depend on the positions seen")
        return bool(setting)

    # --- the two steps --------------------------------------------------------------------

    def prefill(
        self, prompts: Prompts, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 1
    ) -> torch.Tensor:
        """Start a request: run the prompts and leave their state in the cache.

        prompts: a (batch, width) tensor, left-padded as ``attention_mask`` says, or lists of
        token ids (left-padded here). Returns logits (batch, kept, vocab) of the last
        ``logits_to_keep`` positions (0: all).
        """
        return self._prefill(*self._batch(prompts, attention_mask), logits_to_keep)

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (batch,) to the current request -> next logits (batch, vocab).
        With CUDA graphs the logits live in the graph's output buffer until the next decode."""
        if self._request is None:
            raise RuntimeError("no request: call prefill() first")
        return self._decode(self._request, token_ids)

    def decode_greedy(self, token_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`decode`, then each row's most likely next token (batch,): the first maximum of
        the logits, from inside the compiled step where it is compiled (like the logits, in the
        graph's buffer until the next decode)."""
        logits = self.decode(token_ids)
        return self._greedy(self._request, logits)

    def _greedy(self, request: _Request, logits: torch.Tensor) -> torch.Tensor:
        greedy = request.decoder.greedy
        return greedy if greedy is not None else logits.argmax(-1)

    @torch.no_grad()
    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 1,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """max_new_tokens: generate()'s, which leaves a short prompt room to be padded to one of
        ``prefill_widths`` and prefilled from a graph (:meth:`prefill_bucket`). None (prefill()):
        the prompt as it is, eagerly."""
        b, width = input_ids.shape
        graphable = max_new_tokens is not None and logits_to_keep == 1
        bucket = self.prefill_bucket(b, width, max_new_tokens) if graphable else None
        if bucket is not None:
            input_ids, attention_mask = left_pad(input_ids, attention_mask, bucket, self.pad_token_id)
            width = bucket
        if b not in self._decoders:
            # Before this request's prefill: a CUDA-graph capture runs the step and scribbles on the cache.
            self._decoders[b] = self._make_decoder(b)
        self._request = _Request(batch_size=b, decoder=self._decoders[b], next_slot=width)
        cache = self.cache.rows(b)
        if bucket is None:
            return self.stack.prefill(input_ids, attention_mask, cache, logits_to_keep)
        return self.graphed_prefill((b, width), lambda ids, mask: self.stack.prefill(ids, mask, cache),
                                    input_ids, attention_mask)

    def is_compiled(self, batch_size: int) -> bool:
        """Whether requests of ``batch_size`` rows decode with the compiled step (False before
        the first request of that size)."""
        decoder = self._decoders.get(batch_size)
        return decoder is not None and decoder.compiled

    def _make_decoder(self, batch_size: int) -> EagerDecoder:
        inputs = DecodeInputs(self.inputs.token_ids[:batch_size], self.inputs.slot)
        cache = self.cache.rows(batch_size)

        # Compiled, the greedy tokens come out of the step too: inductor's two-stage argmax
        # (greedy_tokens) inside the graph, where an eager argmax after the replay was one aten
        # reduction of 34 us over the 8B shape's 128,256 logits (session 12's profile, 0.7% of the
        # step). Uncompiled, it would be that same reduction, paid by sampling requests too.
        greedy_in_step = self.compile

        def step() -> StepOutput:
            logits = self.stack.decode(inputs.token_ids, inputs.slot, cache)
            return logits, greedy_tokens(logits) if greedy_in_step else None

        decoder = CUDAGraphDecoder if self.use_cuda_graph else EagerDecoder
        if self.compile:
            try:
                return decoder(compile_steps(self, [step])[0], inputs, compiled=True)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                compile_failed(self, err, "the decode step")
        return decoder(step, inputs)

    @torch.no_grad()
    def _decode(self, request: _Request, token_ids: torch.Tensor) -> torch.Tensor:
        if request is not self._request:
            raise RuntimeError("another request started on this engine while this one was being decoded")
        if request.next_slot >= self.stack.num_slots:
            raise ValueError(f"the request filled the engine's {self.stack.num_slots} cache slots "
                             f"(max_length={self.max_length}): make a larger engine")
        if token_ids.shape != (request.batch_size,):
            raise ValueError(
                f"decode takes one token per row, shape ({request.batch_size},), got {tuple(token_ids.shape)}"
            )
        logits = request.decoder(token_ids.to(self.device), request.next_slot)
        request.next_slot += 1
        return logits

    # --- generation -----------------------------------------------------------------------

    def _steps(
        self,
        prompts: Prompts,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stop_token_ids: Sequence[int] | None,
        stop_check_lag: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield, per step, each row's new token (batch,) and whether the row was still running
        (batch,) bool; rows that had stopped emit the pad id. With ``stop_check_lag`` > 0 up to
        that many steps may follow the one where the last row stopped (see StopWatch)."""
        sampling = SamplingParams(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids, attention_mask = self._batch(prompts, attention_mask)
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt width {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                f"engine's max_length={self.max_length}"
            )
        stop = torch.tensor(self._stop_ids(stop_token_ids), dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

        logits = self._prefill(input_ids, attention_mask, max_new_tokens=max_new_tokens)[:, -1]
        request = self._request
        running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
        watch = StopWatch(self.device, stop_check_lag)
        for step in range(max_new_tokens):
            if sampling.greedy and step > 0:  # the decode step's own greedy tokens where it has them
                tokens = self._greedy(request, logits)
            else:
                tokens = sample_next_tokens(logits, sampling, generator)
            tokens = tokens.masked_fill(~running, self.pad_token_id)
            yield tokens, running
            if step + 1 == max_new_tokens:
                return
            if stop.numel():  # without stop tokens every row runs to max_new_tokens: nothing to check
                running = running & ~torch.isin(tokens, stop)
                if watch.all_stopped(running):
                    return
            logits = self._decode(request, tokens)

    def stream(
        self,
        prompts: Prompts,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield one list per step: each row's new token, or None once the row has stopped.

        prompts: lists of token ids, or a left-padded (batch, width) tensor with its mask.
        temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off (see SamplingParams).
        seed fixes the sampling (a torch.Generator); stop_token_ids default to the model's eos.
        A row stops after emitting a stop token (which it emits); all stop at max_new_tokens.
        """
        steps = self._steps(prompts, attention_mask, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        for tokens, running in steps:
            yield [token if active else None for token, active in zip(tokens.tolist(), running.tolist())]

    def generate(
        self,
        prompts: Prompts,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The new tokens (batch, steps), as :meth:`stream` produces them; stopped rows hold the pad
        id. steps <= max_new_tokens: generation ends when every row has stopped."""
        steps = list(self._steps(prompts, attention_mask, max_new_tokens, temperature, top_k, top_p, seed,
                                 stop_token_ids, self.stop_check_lag))
        tokens = torch.stack([tokens for tokens, _ in steps], dim=1)
        running = torch.stack([running for _, running in steps], dim=1)
        # Steps the loop ran after the last row had stopped (StopWatch's lag) hold only padding.
        return tokens[:, : int(running.any(dim=0).nonzero().max()) + 1]


# ---------------------------------------------------------------------------------------------
# The opt-in from a model


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    **options,
) -> torch.Tensor:
    """What ``model.generate(input_ids, attention_mask=..., max_new_tokens=...)`` returns (the
    prompt, then the new tokens), computed by an :class:`Engine`.

    The engine is kept on the model and reused while it is large enough for the request; its
    length is rounded up so that slightly longer requests reuse it too. Options as for
    Engine.generate (greedy by default).
    """
    batch, width = input_ids.shape
    engine = _engine_for(model, batch, width + max_new_tokens)
    new_tokens = engine.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)
    return torch.cat([input_ids.to(new_tokens.device), new_tokens], dim=1)


def engine_if_served(model, max_batch_size: int, max_length: int) -> Engine | None:
    """An Engine over ``model``, or None where the Engine cannot serve it (not a causal LM with an
    LM head, or an architecture it does not run): callers then fall back to transformers' generate."""
    if not isinstance(model, nn.Module) or not hasattr(model, "lm_head"):
        return None
    try:
        return Engine(model, max_batch_size=max_batch_size, max_length=max_length)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as err:
        logger.info("the Engine cannot serve %s (%s): transformers' generate instead", type(model).__name__, err)
        return None


_ENGINE_ATTRIBUTE = "_mambaify_engine"
_LENGTH_QUANTUM = 256


def _engine_for(model: nn.Module, batch_size: int, length: int) -> Engine:
    engine: Engine | None = getattr(model, _ENGINE_ATTRIBUTE, None)
    weight = model.lm_head.weight
    if (
        engine is None
        or engine.max_batch_size < batch_size
        or engine.max_length < length
        or (engine.device, engine.dtype) != (weight.device, weight.dtype)
    ):
        setattr(model, _ENGINE_ATTRIBUTE, None)  # let the old engine's caches go before allocating new ones
        engine = Engine(
            model,
            max_batch_size=batch_size,
            max_length=-(-length // _LENGTH_QUANTUM) * _LENGTH_QUANTUM,
        )
        setattr(model, _ENGINE_ATTRIBUTE, engine)
    return engine


__all__ = [
    "COMPILE_MODES",
    "AttentionRunner",
    "CUDAGraphDecoder",
    "CompileError",
    "DecodingStack",
    "EagerDecoder",
    "Engine",
    "GenerationFrontend",
    "KVBuffers",
    "MambaBuffers",
    "MambaRunner",
    "PreparedNorm",
    "PreparedStream",
    "StaticCache",
    "check_compile_options",
    "check_small_batch_linear",
    "resolve_small_batch_linear",
    "compile_step",
    "engine_if_served",
    "generate",
    "grouped_query_attention",
    "prepared_norms_default",
]
