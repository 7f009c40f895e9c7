"""Speculative decoding on static caches, with the draft and verify steps replayed as CUDA graphs.

The fast counterpart of :mod:`mambaify.generate.speculative` (the CPU reference; PAPER.md
section 3), built like :mod:`mambaify.generate.engine`: buffers allocated once, a prefill over the
left-padded prompts, then fixed-shape steps that read and write the buffers in place, so that a
CUDA graph can capture each of them once and replay it every round.

One round, for every row at once (K draft tokens per round):

1. **Draft round** (one graph per K): the draft runs K steps. The draft is one committed token
   behind the target (below), so step 0 takes two tokens, ``[prev, last]``: ``prev`` the
   committed token before ``last``, which the draft has not folded in yet, and ``last`` the
   newest committed token. Steps 1..K-1 take one token each, d_1..d_{K-1}, where d_i is the
   token step i - 1 chose (argmax, or sampled with its distribution q_i kept); step K - 1
   chooses dK.
2. **Verify round** (one graph per K): the target runs the K + 1 tokens ``[last, d1..dK]`` in one
   call, accepts per row the longest prefix n of the drafts (greedy: matching its argmax; sampling:
   the standard rejection rule, so that tokens are distributed as the target's), appends its
   own next token, and *commits* n + 1 tokens in both models: per-row lengths advance by n + 1
   and the Mamba layers' fold counts are set to n + 1. Stop tokens and max_new_tokens end rows
   here too; a finished row commits nothing from then on.

**The draft one token behind.** The draft's calls of a round cover ``[prev, last, d1..d_{K-1}]``
and the target's ``[last, d1..dK]``; both commit the same count n + 1 of their tokens, so the
draft's committed tokens are the target's but the newest, which becomes the next ``prev``
(dK when all K were accepted: a token the draft never ran; otherwise d_n or ``last``, which it
runs again at the same slot). The draft's prefill stops before the prompt's last two tokens, and
a pad column in front gives one-token prompts a ``prev``, a pad that the first round masks as the
prefill masks pads (``prev_real``). A round thus makes K draft calls where running dK in a call
of its own (to keep the draft level with the target) would make K + 1. A draft call costs about
what its kernel launches cost when the draft is small (SmolLM2 on the H200: about 0.15 of a
target step), so at K = 2 that is about a tenth of a round. Both models' lengths and counts
advance alike; the draft's pad_lengths are the target's plus one.

State, per model (the draft's and the target's are alike):

* Attention layers: K/V buffers (batch, kv_heads, slots, head_dim). Row b's committed tokens,
  left padding included, fill slots 0..lengths[b]-1; a call over t tokens writes slots
  lengths[b]..lengths[b]+t-1 and its queries see the row's real slots up to their own. Rejected
  tokens are "truncated" by not advancing lengths[b]: they lie past every later query's causal
  mask and are overwritten by the next call.
* Mamba layers: one checkpointed SSM state at the last folded token, the inputs (x, dt, B) of
  the last call's K + 1 tokens, and a conv window of d_conv - 1 + K + 1 raw inputs. A call first
  folds the counts[b] accepted tokens into the checkpoint and slides the window (the fused
  ``ops.ssd_verify_inplace`` / ``ops.conv_verify_inplace``), then runs its tokens from there
  without storing per-token states. The draft's round is that verify call done one token at a
  time: step 0 folds, copies the checkpoint into a transient running state and conv state,
  and steps 1..K advance only those (``ops.ssd_step_inplace`` / ``ops.conv_step_inplace``) while
  caching each token's inputs; the next round folds what the target accepted.

Randomness: the uniforms a round needs (K for the draft's samples, K for the acceptance tests,
one for the final token) are drawn before the round from a ``torch.Generator`` on the device,
and tokens are drawn from them by inverse CDF, so a graph holds no random number generator and
seeded runs reproduce, eagerly or from a graph.

Adaptive K (``k="auto"``): each round picks, among the K values with captured graphs, the one
with the most expected tokens per second, (1 - a^(K+1)) / (1 - a) tokens per row and round at a
running per-token acceptance rate a, over the measured time of that K's draft round, verify call
and the device's idle time between rounds (see :class:`AdaptiveK`).

The host one round ahead (``launch_ahead``, on CUDA): the host reads one small report per round
(each row's accepted count and tokens), but it queues round n + 1 before it waits for round n's
report, which reaches pinned host memory behind the round. So the device runs round n + 1 while
the host reads, yields and bookkeeps round n, instead of idling for it. Nothing a round needs
from the last comes through the host; only adaptive K learns a round later.

Compiled rounds (``SpeculativeEngine(compile=True)``, or "auto": on CUDA): the draft round and
the verify round are each compiled whole by torch.compile, with the plain engine's
:func:`~mambaify.generate.engine.compile_step` (one graph, static shapes, no CUDA graphs of
inductor's own), before their CUDA-graph capture and before the request's prefill, once per
(batch size, K, sampling settings). Inductor fuses the many small kernels of a round (norms,
RoPE, SiLU * up, residual adds, the acceptance and sampling arithmetic) that cost microseconds
each even inside a graph; the Mamba decode and verify kernels and the split-K attention stay one
opaque custom op each (``torch.ops.mambaify.*``, see :mod:`mambaify.ops`). Off by default: each
setting costs two compiles (seconds each, more on a cold cache).

Reading order: kernels -> buffers -> RowContext / attend_rows -> mamba_verify / mamba_draft_step
-> SpeculativeStack -> RoundBuffers / round functions -> AdaptiveK -> SpeculativeEngine ->
generate() / assisted_generate().
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.modeling import Mamba2Mixer
from ..ops.attention import decode_attention_op
from .clock import Clock
from .engine import (
    AttentionRunner,
    DecodingStack,
    FoldedNorm,
    GenerationFrontend,
    KVBuffers,
    LinearCall,
    MambaBuffers,
    MambaRunner,
    Prompts,
    StaticCache,
    _rope_is_static,
    capture_cuda_graph,
    check_compile_options,
    compile_failed,
    compile_steps,
    fast_path_enabled,
    few_row_linear,
    fold_norms_default,
    linear_plus,
    mamba_out_projection,
    normed_linear,
    resolve_small_batch_linear,
    grouped_query_attention,
    left_pad,
    module_linear,
    pad_slots_for,
    stream_of,
    use_split_k_attention,
)
from .sampling import SamplingParams, greedy_tokens, keep_top_k, keep_top_p
from .speculative import accept_greedy, rejection_rule, sample_inverse_cdf

KChoice = int | Literal["auto"]
DEFAULT_K_CHOICES = (1, 2, 3, 4, 6, 8)
STOP_SLOTS = 16  # stop token ids a request may give (the buffer a graph reads them from)

# ---------------------------------------------------------------------------------------------
# Buffers


@dataclass
class MambaVerifyBuffers:
    """One Mamba layer's verification state (b rows, T = K_max + 1 tokens per call).

    checkpoint (b,h,n,p): the SSM state after the last folded token (float32 at least).
    x (b,T,h,p), dt (b,T,h), B (b,T,h,n): the inputs of the last call's tokens.
    window (b, d_conv-1+T, conv_dim): the raw conv inputs before the last call, then its tokens'.
    running_state (b,h,n,p), running_conv (b, conv_dim, d_conv-1): the draft's transient state
    during a draft round (None for a target).
    states (b,T,h,n,p): every per-token state, for the naive store-states verify (None otherwise).
    """

    checkpoint: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    window: torch.Tensor
    running_state: torch.Tensor | None = None
    running_conv: torch.Tensor | None = None
    states: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, mixer: Mamba2Mixer, batch: int, tokens: int, dtype: torch.dtype, device: torch.device,
        draft: bool, store_states: bool,
    ) -> MambaVerifyBuffers:
        h, p, n, c = mixer.num_heads, mixer.head_dim, mixer.d_state, mixer.conv_dim
        state_dtype = torch.promote_types(dtype, torch.float32)

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        return cls(
            checkpoint=zeros(batch, h, n, p, dt=state_dtype),
            x=zeros(batch, tokens, h, p),
            dt=zeros(batch, tokens, h),
            B=zeros(batch, tokens, h, n),
            window=zeros(batch, mixer.d_conv - 1 + tokens, c),
            running_state=zeros(batch, h, n, p, dt=state_dtype) if draft else None,
            running_conv=zeros(batch, c, mixer.d_conv - 1) if draft else None,
            states=zeros(batch, tokens, h, n, p, dt=state_dtype) if store_states else None,
        )

    def rows(self, n: int) -> MambaVerifyBuffers:
        return MambaVerifyBuffers(*(None if t is None else t[:n] for t in (
            self.checkpoint, self.x, self.dt, self.B, self.window, self.running_state, self.running_conv, self.states
        )))

    def as_decode_buffers(self) -> MambaBuffers:
        """The engine's view of this state for a prefill: its conv state is the window's first
        d_conv - 1 rows (a transposed view, written in place), its SSM state the checkpoint."""
        d_conv_minus_1 = self.window.shape[1] - self.x.shape[1]
        return MambaBuffers(self.window[:, :d_conv_minus_1].transpose(1, 2), self.checkpoint)


@dataclass
class SpeculativeCache:
    """A model's buffers for speculative decoding, one per layer, plus per-row bookkeeping:
    pad_lengths (b,) the left padding, lengths (b,) the committed slots (padding included),
    counts (b,) the tokens of the last call to fold into the Mamba checkpoints."""

    layers: list[KVBuffers | MambaVerifyBuffers]
    pad_lengths: torch.Tensor
    lengths: torch.Tensor
    counts: torch.Tensor

    def rows(self, n: int) -> SpeculativeCache:
        """The first n rows, as views: a graph captured on them sees every update."""
        return SpeculativeCache(
            [layer.rows(n) for layer in self.layers], self.pad_lengths[:n], self.lengths[:n], self.counts[:n]
        )

    def as_static_cache(self) -> StaticCache:
        layers = [b.as_decode_buffers() if isinstance(b, MambaVerifyBuffers) else b for b in self.layers]
        return StaticCache(layers, self.pad_lengths)


# ---------------------------------------------------------------------------------------------
# Attention with per-row slots


@dataclass
class RowContext:
    """Where one call's tokens sit, per row, shared by all layers.

    slots (b,t): each token's cache slot (row b: lengths[b] + offset + 0..t-1).
    pad_lengths (b,): each row's first real slot (its left padding comes before).
    mask (b,1,t,S) bool: the row's real slots up to the query's own, and the query's own slot
    (built on the CPU only: on CUDA the split-K kernel reads slots and pad_lengths directly).
    key_slots (S,): all slots; rotary: RoPE (cos, sin) at the tokens' positions, or None.
    rows (b,), heads (H,): aranges that index the K/V caches by row and head.
    """

    slots: torch.Tensor
    pad_lengths: torch.Tensor
    mask: torch.Tensor | None
    key_slots: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    rows: torch.Tensor
    heads: torch.Tensor  # as many as the layer with the most K/V heads has

    def attention_mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window is None:
            return self.mask
        # A row's real tokens sit in consecutive slots, so slot distance is position distance.
        in_window = self.slots[:, None, :, None] - self.key_slots < sliding_window
        return self.mask & in_window


def attend_rows(runner: AttentionRunner, hidden: torch.Tensor, ctx: RowContext, kv: KVBuffers,
                norm: FoldedNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``AttentionRunner.forward`` with each row writing its keys/values at its own slots (``norm``
    and ``residual`` folded into the GEMVs as there)."""
    attn = runner.attention
    b, t, _ = hidden.shape
    query, key, value = runner.project(hidden, norm)
    query, key = runner.apply_rotary(query, key, *ctx.rotary)
    # index_put_, not scatter_: torch.compile turns a scatter_ into a cache buffer (the whole of
    # it) copied out, scattered and copied back, two extra kernels that grow with the context,
    # while it writes an index_put_ in place (profile_rounds.py, BENCHMARKS.md "Session 10").
    where = (ctx.rows[:, None, None], ctx.heads[None, : runner.num_kv_heads, None], ctx.slots[:, None, :])
    kv.keys.index_put_(where, key)
    kv.values.index_put_(where, value)
    if ctx.mask is None:
        # Split-K over each row's real slots only (mambaify.ops.attention): the same rule as the mask.
        out = decode_attention_op(
            query, kv.keys, kv.values, ctx.pad_lengths, ctx.slots, attn.scaling, runner.sliding_window
        )
    else:
        out = grouped_query_attention(
            query, kv.keys, kv.values, ctx.attention_mask(runner.sliding_window), attn.scaling
        )
    return linear_plus(runner.linear, attn.o_proj, out.transpose(1, 2).reshape(b, t, -1), residual)


# ---------------------------------------------------------------------------------------------
# Mamba layers: a verify call, and a draft step


def _mamba_inputs(mixer: Mamba2Mixer, activated: torch.Tensor, dt: torch.Tensor):
    x, B, C = mixer.split_heads(activated)
    return x, B, C, F.softplus(dt + mixer.dt_bias)


def mamba_verify(
    mixer: Mamba2Mixer, hidden: torch.Tensor, buf: MambaVerifyBuffers, counts: torch.Tensor,
    linear: LinearCall = module_linear, norm: FoldedNorm | None = None, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba layer over t tokens (b,t,d) from the checkpoint after folding counts[b] tokens
    (the fused kernels, or the naive store-every-state call when ``buf.states`` is allocated);
    ``linear`` runs in_proj and out_proj (see :class:`~mambaify.generate.engine.DecodingStack`);
    ``norm`` and ``residual``: folded into them (``fold_norms``).

    The counts are the engine's own commits (0..K+1, within the caches by construction), so the
    kernels do not check them: a check reads them back, a device-to-host wait per kernel that
    only a CUDA graph's capture skips (uncaptured rounds paid four per Mamba layer)."""
    b, t, _ = hidden.shape
    z, xBC, dt = mixer.split_projection(normed_linear(linear, mixer.in_proj, hidden, norm))
    conv = ops.conv_verify_inplace(buf.window, counts, xBC, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, silu=True,
                                   check_counts_values=False)
    if buf.states is None:
        # x and B per kv head and dt raw, as in the engine's decode step: the kernel reads each
        # head's group and applies the softplus, and no kernel copies them out per head first.
        x, B, C = mixer.split_groups(conv)
        y = ops.ssd_verify_inplace(buf.checkpoint, buf.x, buf.dt, buf.B, counts, x, dt, mixer.A, B, C, mixer.D,
                                   check_counts_values=False, dt_bias=mixer.dt_bias)
    else:
        x, B, C, dt = _mamba_inputs(mixer, conv, dt)
        y = ops.ssd_verify_store_states(buf.checkpoint, buf.states, counts, x, dt, mixer.A, B, C, mixer.D,
                                        check_counts_values=False)
    return mamba_out_projection(mixer, y.reshape(b, t, mixer.d_inner), z, linear, residual)


def mamba_draft_step(
    mixer: Mamba2Mixer, hidden: torch.Tensor, buf: MambaVerifyBuffers, counts: torch.Tensor, step: int,
    prev_real: torch.Tensor, linear: LinearCall = module_linear, norm: FoldedNorm | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step ``step`` of a draft round: "a verify call done one token at a time", the first two.

    Step 0 takes two tokens (b,2,d), ``[prev, last]``: a two-token verify call (folds counts[b]
    tokens into the checkpoint, slides the window, caches both tokens' inputs at positions 0
    and 1) that then runs the state after both into the transient running state. A ``prev``
    that is a pad (``prev_real`` False) enters as the prefill's pads do: zeros into the conv
    window, dt = 0. Steps 1..K-1 take one token (b,1,d), advance only the running state and
    conv, and cache their token's inputs at position ``step + 1`` and its raw conv input in the
    window, so that the next round's fold sees the layout of a verify call over all K + 1 tokens.
    ``linear`` runs in_proj and out_proj, ``norm`` and ``residual`` folded into them.
    """
    b, t, _ = hidden.shape
    z, xBC, dt = mixer.split_projection(normed_linear(linear, mixer.in_proj, hidden, norm))
    weight, bias = mixer.conv1d.weight[:, 0], mixer.conv1d.bias
    d_conv = mixer.d_conv
    if step == 0:
        pad = torch.stack([~prev_real, torch.zeros_like(prev_real)], 1)[..., None]  # (b, 2, 1)
        activated = ops.conv_verify_inplace(buf.window, counts, xBC.masked_fill(pad, 0.0), weight, bias, silu=True,
                                            check_counts_values=False)
        x, B, C, dt = _mamba_inputs(mixer, activated, dt)
        dt = dt.masked_fill(pad, 0.0)
        y = ops.ssd_verify_inplace(buf.checkpoint, buf.x, buf.dt, buf.B, counts, x, dt, mixer.A, B, C, mixer.D,
                                   check_counts_values=False)
        buf.running_state.copy_(buf.checkpoint)
        for i in range(2):
            ops.ssd_step_inplace(buf.running_state, x[:, i], dt[:, i], mixer.A, B[:, i], C[:, i])
        buf.running_conv.copy_(buf.window[:, 2 : d_conv + 1].transpose(1, 2))
    else:
        position = step + 1
        activated = ops.conv_step_inplace(buf.running_conv, xBC[:, 0], weight, bias)  # SiLU-ed
        buf.window[:, d_conv - 1 + position].copy_(xBC[:, 0])
        x, B, C, dt = _mamba_inputs(mixer, activated[:, None], dt)
        y = ops.ssd_step_inplace(buf.running_state, x[:, 0], dt[:, 0], mixer.A, B[:, 0], C[:, 0], mixer.D)[:, None]
        buf.x[:, position].copy_(x[:, 0])
        buf.dt[:, position].copy_(dt[:, 0])
        buf.B[:, position].copy_(B[:, 0])
    return mamba_out_projection(mixer, y.reshape(b, t, mixer.d_inner), z, linear, residual)


# ---------------------------------------------------------------------------------------------
# The whole model


class SpeculativeStack(DecodingStack):
    """A causal LM's modules (a hybrid, pure Mamba2, or a Llama-family model) run against a
    :class:`SpeculativeCache`: a prefill, a verify call over t <= max_tokens tokens per row, and
    a draft step of one token per row. num_slots bounds the committed tokens plus one call's."""

    def __init__(self, model: nn.Module, num_slots: int, max_tokens: int, linear: LinearCall = module_linear,
                 fold_norms: bool = False):
        super().__init__(model, num_slots, linear, fold_norms)
        self.max_tokens = max_tokens
        self.vocab_size = model.lm_head.weight.shape[0]
        self.token_range = torch.arange(max_tokens, device=self.slot_range.device)
        kv_heads = [r.mixer.num_kv_heads for r in self.layers if isinstance(r.mixer, AttentionRunner)]
        self.kv_head_range = torch.arange(max(kv_heads, default=0), device=self.slot_range.device)

    def allocate_speculative(
        self, batch: int, dtype: torch.dtype, device: torch.device, *, draft: bool = False,
        store_states: bool = False,
    ) -> SpeculativeCache:
        layers = []
        for runner in self.layers:
            if isinstance(runner.mixer, MambaRunner):
                layers.append(MambaVerifyBuffers.allocate(
                    runner.mixer.mixer, batch, self.max_tokens, dtype, device, draft, store_states
                ))
            else:
                layers.append(runner.mixer.allocate(batch, self.num_slots, dtype, device))

        def per_row():
            return torch.zeros(batch, dtype=torch.long, device=device)

        return SpeculativeCache(layers, per_row(), per_row(), per_row())

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: SpeculativeCache) -> None:
        """Run a left-padded prompt batch (b, W) (W may be 0) from slot 0; nothing left to fold."""
        b, width = input_ids.shape
        if width:
            self.prefill(input_ids, attention_mask, cache.as_static_cache())
        else:
            cache.pad_lengths.zero_()
            for buffers in cache.layers:
                if isinstance(buffers, MambaVerifyBuffers):
                    buffers.checkpoint.zero_()
                    buffers.window.zero_()
        cache.lengths.fill_(width)
        cache.counts.zero_()

    def row_context(self, hidden: torch.Tensor, slots: torch.Tensor, pad_lengths: torch.Tensor) -> RowContext:
        keys = self.slot_range
        mask = None
        if not use_split_k_attention(hidden.device):
            causal = keys <= slots[:, :, None]  # (b, t, S)
            real = keys >= pad_lengths[:, None, None]
            own = keys == slots[:, :, None]
            mask = ((causal & real) | own)[:, None]
        rotary = None
        if self.has_attention:
            rotary = self.rotary_emb(hidden, (slots - pad_lengths[:, None]).clamp(min=0))
        rows = torch.arange(slots.shape[0], device=slots.device)
        return RowContext(slots, pad_lengths, mask, keys, rotary, rows, self.kv_head_range)

    def _run(self, token_ids: torch.Tensor, first_slot_offset: int, cache: SpeculativeCache,
             mamba: Callable[[Mamba2Mixer, torch.Tensor, MambaVerifyBuffers], torch.Tensor]) -> torch.Tensor:
        t = token_ids.shape[1]
        hidden = self.embed_tokens(token_ids)
        slots = cache.lengths[:, None] + first_slot_offset + self.token_range[:t]
        ctx = self.row_context(hidden, slots, cache.pad_lengths)
        for runner, buffers in zip(self.layers, cache.layers):
            layer = runner.layer
            if runner.folded_norms is not None:  # norms and residual adds inside the GEMVs
                if isinstance(runner.mixer, AttentionRunner):
                    def mix(x, norm, residual, runner=runner, buffers=buffers):
                        return attend_rows(runner.mixer, x, ctx, buffers, norm, residual)
                else:
                    def mix(x, norm, residual, runner=runner, buffers=buffers):
                        return mamba(runner.mixer.mixer, x, buffers, norm, residual)
                hidden = runner.run_folded(mix, hidden)
                continue
            normed = layer.input_layernorm(hidden)
            if isinstance(runner.mixer, AttentionRunner):
                hidden = hidden + attend_rows(runner.mixer, normed, ctx, buffers)
            else:
                hidden = hidden + mamba(runner.mixer.mixer, normed, buffers)
            hidden = hidden + runner.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def verify(self, token_ids: torch.Tensor, cache: SpeculativeCache) -> torch.Tensor:
        """token_ids (b,t) at each row's next t slots -> logits (b,t,V). Commit afterwards by
        advancing cache.lengths and setting cache.counts (see SpeculativeEngine)."""
        if token_ids.shape[1] > self.max_tokens:
            raise ValueError(f"a verify call takes at most {self.max_tokens} tokens, got {token_ids.shape[1]}")

        def mamba(mixer, hidden, buffers, norm=None, residual=None):
            return mamba_verify(mixer, hidden, buffers, cache.counts, self.linear, norm, residual)

        return self.logits(self._run(token_ids, 0, cache, mamba))

    def draft_step(self, token_ids: torch.Tensor, step: int, cache: SpeculativeCache,
                   prev_real: torch.Tensor) -> torch.Tensor:
        """Draft step ``step`` of a round -> logits (b,V) for the token after its last input.
        Step 0: token_ids (b,2) ``[prev, last]`` at slots lengths[b] + 0, 1 (``prev_real``: see
        :func:`mamba_draft_step`); step i >= 1: (b,1) at slot lengths[b] + i + 1."""
        if not 0 <= step < self.max_tokens - 1:
            raise ValueError(f"a draft round has at most {self.max_tokens - 1} steps, got step {step}")
        if token_ids.shape[1] != (2 if step == 0 else 1):
            raise ValueError(f"draft step {step} takes {2 if step == 0 else 1} token(s) per row, got {token_ids.shape[1]}")

        def mamba(mixer, hidden, buffers, norm=None, residual=None):
            return mamba_draft_step(mixer, hidden, buffers, cache.counts, step, prev_real, self.linear, norm, residual)

        hidden = self._run(token_ids, 0 if step == 0 else step + 1, cache, mamba)
        return self.logits(stream_of(hidden)[:, -1])  # the last token's row alone: its own final norm


# ---------------------------------------------------------------------------------------------
# Choosing tokens


def token_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """softmax of the warped logits (..., V) in float32: temperature, then top-k, then top-p
    (as sample_next_tokens warps them), so that draft and target are compared on the same terms."""
    scores = logits.float() / params.temperature
    if params.top_k:
        scores = keep_top_k(scores, params.top_k)
    if params.top_p < 1:
        scores = keep_top_p(scores, params.top_p)
    return scores.softmax(dim=-1)


# A draft folder may hold the token ids its LM head is cut to (mambaify distill-draft --draft-vocab).
DRAFT_VOCAB_FILE = "draft_vocab.json"


def saved_draft_vocab(draft_dir) -> list[int] | None:
    """The token ids saved with a draft (``DRAFT_VOCAB_FILE`` in its folder), or None."""
    import json
    from pathlib import Path

    path = Path(draft_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        return [int(t) for t in json.loads(path.read_text())["token_ids"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a draft vocabulary ({err}); delete it to use the whole draft head") from None


def cut_head(head: nn.Linear, ids: torch.Tensor) -> nn.Linear:
    """A copy of ``head``'s rows ``ids``: logits over those tokens only."""
    cut = nn.Linear(head.in_features, ids.numel(), bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        cut.weight.copy_(head.weight[ids])
        if head.bias is not None:
            cut.bias.copy_(head.bias[ids])
    return cut.requires_grad_(False)


def frequent_tokens(token_lists, n: int, always: Sequence[int] = ()) -> list[int]:
    """The ``n`` ids most frequent in ``token_lists`` (sequences of token ids), plus ``always``
    (e.g. the stop tokens), for ``SpeculativeEngine(draft_vocab=...)``; ties go to the lower id."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: dict[int, int] = {}
    for tokens in token_lists:
        for token in tokens:
            counts[int(token)] = counts.get(int(token), 0) + 1
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:n]
    return sorted(set(ranked) | {int(t) for t in always})


def fit_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A draft's logits on the target's vocabulary: extra rows dropped, missing ones -inf
    (models of one tokenizer often pad their embedding tables to different sizes)."""
    have = logits.shape[-1]
    if have == vocab_size:
        return logits
    if have > vocab_size:
        return logits[..., :vocab_size]
    return F.pad(logits, (0, vocab_size - have), value=float("-inf"))


# ---------------------------------------------------------------------------------------------
# One round's buffers and the two steps a graph captures


@dataclass
class RoundBuffers:
    """What a round reads and writes besides the models' caches (max_batch rows, K <= k_max).

    last (B,): each row's newest committed token, the first input of the next round.
    prev (B,): the committed token before it, which the draft runs first in the next round;
    prev_real (B,) bool: False where that is a pad (a one-token prompt's first round).
    drafts (B, k_max); q (B, k_max, V) float32: the draft's distributions (sampling only).
    uniforms (B, 2 k_max + 1): the round's random numbers (drafts, acceptance tests, next token).
    generated (B,), active (B,) bool, max_new (1,), stop_ids (STOP_SLOTS,) padded with -1.
    report (B, 4 + k_max + 1): per row [was active, accepted n, emitted count, still active,
    emitted tokens...], the one thing the host reads back per round.
    """

    last: torch.Tensor
    prev: torch.Tensor
    prev_real: torch.Tensor
    drafts: torch.Tensor
    q: torch.Tensor | None
    uniforms: torch.Tensor
    generated: torch.Tensor
    active: torch.Tensor
    max_new: torch.Tensor
    stop_ids: torch.Tensor
    report: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, k_max: int, device: torch.device) -> RoundBuffers:
        def longs(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(
            last=longs(batch), prev=longs(batch), prev_real=torch.ones(batch, dtype=torch.bool, device=device),
            drafts=longs(batch, k_max), q=None,
            uniforms=torch.zeros(batch, 2 * k_max + 1, device=device),
            generated=longs(batch), active=torch.zeros(batch, dtype=torch.bool, device=device),
            max_new=longs(1), stop_ids=longs(STOP_SLOTS), report=longs(batch, 4 + k_max + 1),
        )


class GraphedStep:
    """A step captured once in a CUDA graph (after a warm-up on a side stream, as PyTorch's
    CUDA-graph notes prescribe) and replayed. The step must write its results into persistent
    buffers and return nothing: then graphs can share one memory pool whatever order they are
    replayed in, since none keeps a live tensor in it."""

    def __init__(self, step: Callable[[], None], pool, warmup_steps: int = 2):
        self.graph, _ = capture_cuda_graph(step, warmup_steps, pool)

    def __call__(self) -> None:
        self.graph.replay()


@dataclass
class RoundProgram:
    """The draft round and the verify round of one (batch size, K, sampling) setting; compiled:
    whether both run torch.compile'd code."""

    k: int
    draft: Callable[[], None]
    verify: Callable[[], None]
    compiled: bool = False


# ---------------------------------------------------------------------------------------------
# Statistics and the choice of K


@dataclass
class SpeculativeStats:
    """One request's counts. row_rounds: (row, round) pairs in which the row was generating;
    accepted: draft tokens accepted over those; emitted: tokens emitted (accepted + the target's
    own, less what a stop token or max_new_tokens cut). seconds: prefill and rounds, wall clock.
    accepted_counts: per K, how many (row, round) pairs accepted 0, 1, ..., K drafts: the
    distribution behind the mean (:meth:`accepted_at` reads other K from it)."""

    rounds: int = 0
    row_rounds: int = 0
    accepted: int = 0
    emitted: int = 0
    seconds: float = 0.0
    k_used: dict[int, int] = field(default_factory=dict)
    accepted_counts: dict[int, list[int]] = field(default_factory=dict)

    def observe(self, k: int, accepted: Sequence[int], emitted: int) -> None:
        """One round at K: each generating row's accepted drafts, and the tokens all rows emitted."""
        self.rounds += 1
        self.row_rounds += len(accepted)
        self.accepted += sum(accepted)
        self.emitted += emitted
        self.k_used[k] = self.k_used.get(k, 0) + 1
        counts = self.accepted_counts.setdefault(k, [0] * (k + 1))
        for n in accepted:
            counts[n] += 1

    def add(self, other: SpeculativeStats) -> SpeculativeStats:
        """Every count of ``other`` (another request's) added to these; returns self."""
        for name in ("rounds", "row_rounds", "accepted", "emitted", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, n in other.k_used.items():
            self.k_used[k] = self.k_used.get(k, 0) + n
        for k, per_n in other.accepted_counts.items():
            self.accepted_counts[k] = [a + b for a, b in zip(self.accepted_counts.get(k, [0] * len(per_n)), per_n)]
        return self

    def accepted_at(self, k: int) -> float | None:
        """Mean accepted drafts per row and round had every round run at K, read off the rounds at
        the smallest K' >= K that ran: a draft proposes its first K tokens alike whatever K' is
        (greedy: the same tokens), so a round that accepted n of K' drafts would have accepted
        min(n, K) of K. None where no round ran at K or above. (At K' > K the rounds start at
        other places in the text, so this is an estimate where K' != K, not a measurement.)"""
        return accepted_at(self.accepted_counts, k)

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per row and verify call."""
        return self.accepted / max(self.row_rounds, 1)

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per row and verify call (mean accepted + 1, less cut-offs)."""
        return self.emitted / max(self.row_rounds, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.emitted / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(rounds=self.rounds, row_rounds=self.row_rounds, accepted=self.accepted, emitted=self.emitted,
                    seconds=self.seconds, mean_accepted=self.mean_accepted, tokens_per_round=self.tokens_per_round,
                    tokens_per_second=self.tokens_per_second, k_used=dict(self.k_used),
                    accepted_counts={k: list(c) for k, c in self.accepted_counts.items()})


def accepted_at(accepted_counts: dict[int, Sequence[int]], k: int) -> float | None:
    """:meth:`SpeculativeStats.accepted_at` over ``accepted_counts`` (K -> rounds that accepted
    0..K drafts; JSON's string keys are taken too)."""
    by_k = {int(j): counts for j, counts in accepted_counts.items() if sum(counts)}
    above = sorted(j for j in by_k if j >= k)
    if not above:
        return None
    counts = by_k[above[0]]
    return sum(min(n, k) * rounds for n, rounds in enumerate(counts)) / sum(counts)


@dataclass
class RoundTimes:
    """Measured seconds of one setting's rounds, per K (moving averages): the draft round, the
    verify round, and the host's share (launches, the read-back, bookkeeping)."""

    draft: dict[int, float] = field(default_factory=dict)
    verify: dict[int, float] = field(default_factory=dict)
    overhead: float | None = None

    def observe(self, k: int, draft_s: float, verify_s: float, wall_s: float, weight: float = 0.3) -> None:
        def mix(old, new):
            return new if old is None else (1 - weight) * old + weight * new

        self.draft[k] = mix(self.draft.get(k), draft_s)
        self.verify[k] = mix(self.verify.get(k), verify_s)
        self.overhead = mix(self.overhead, max(wall_s - draft_s - verify_s, 0.0))

    def round_seconds(self, k: int) -> float | None:
        """The expected time of a round at K: measured, or estimated from the K values measured
        (the draft's cost per step times K + 1; the verify time interpolated, flat outside)."""
        if not self.verify:
            return None
        draft = self.draft.get(k)
        if draft is None:
            draft = (k + 1) * sum(s / (j + 1) for j, s in self.draft.items()) / len(self.draft)
        verify = self.verify.get(k)
        if verify is None:
            known = sorted(self.verify)
            below = [j for j in known if j < k]
            above = [j for j in known if j > k]
            if below and above:
                lo, hi = below[-1], above[0]
                verify = self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)
            else:
                verify = self.verify[below[-1] if below else above[0]]
        return draft + verify + (self.overhead or 0.0)


class AdaptiveK:
    """Picks K for the next round among ``choices`` to maximise expected tokens per second.

    Acceptance: a draft token is taken to be accepted with a fixed probability a given that the
    ones before it were, so a round at K yields (1 - a^(K+1)) / (1 - a) tokens per row. a is
    estimated as accepted / tried over past rounds (a row that accepts n < K drafts tried n + 1,
    one that accepts all K tried K), starting from a prior worth a few tokens and forgetting old
    rounds geometrically, so that it follows the text. Cost: :meth:`RoundTimes.round_seconds`.
    """

    def __init__(self, choices: Sequence[int], times: RoundTimes, start: int | None = None,
                 prior_alpha: float = 0.6, prior_tokens: float = 4.0, memory: float = 0.95):
        self.choices = sorted(set(choices))
        self.times = times
        self.start = start if start is not None else min(self.choices, key=lambda k: abs(k - 4))
        self.memory = memory
        self.hits, self.tries = prior_alpha * prior_tokens, prior_tokens

    @property
    def alpha(self) -> float:
        return self.hits / self.tries

    def observe(self, k: int, accepted: Sequence[int]) -> None:
        self.hits *= self.memory
        self.tries *= self.memory
        for n in accepted:
            self.hits += n
            self.tries += n + (n < k)

    def expected_tokens(self, k: int) -> float:
        a = self.alpha
        return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)

    def choose(self) -> int:
        cost = {k: self.times.round_seconds(k) for k in self.choices}
        if any(c is None or c <= 0 for c in cost.values()):
            return self.start
        return max(self.choices, key=lambda k: self.expected_tokens(k) / cost[k])


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Request:
    batch_size: int


@dataclass
class _InFlight:
    """A launched round: its timing marks, and its report on its way to host memory (pinned on
    CUDA, so that the copy runs behind the round without the host waiting for it)."""

    program: RoundProgram
    start: object
    middle: object
    end: object
    host_report: torch.Tensor
    copied: torch.cuda.Event | None

    def read(self) -> list[list[int]]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_report.tolist()


@dataclass(frozen=True)
class _RoundReport:
    """One row's outcome of a round, as read back from the report buffer."""

    was_active: bool
    accepted: int
    tokens: list[int]
    still_active: bool


class SpeculativeEngine(GenerationFrontend):
    """Batched speculative decoding of ``target`` with proposals from ``draft``, over static
    caches, for a hybrid, a pure Mamba2 model or a Llama-family target, and any causal LM of the
    same tokenizer as the draft (a small Transformer, a Llama-family model, a pure-Mamba2 hybrid).

    k: tokens the draft proposes per round, or "auto" to choose per round among ``k_choices``
    (see :class:`AdaptiveK`); a request may override it (``k=`` of stream/generate) within
    max(k, k_choices) for "auto", or k for a fixed value, the largest K the buffers hold.
    max_batch_size / max_length: as for :class:`~mambaify.generate.engine.Engine` (prompt width
    + max_new_tokens <= max_length). use_cuda_graph: "auto" captures each round's two steps on
    CUDA, once per (batch size, K, sampling settings), before the request's prefill.
    store_states: the target's Mamba layers verify with the naive call that stores every
    per-token state instead of the fused checkpoint + replay one (for benchmarks).
    draft_vocab: token ids the draft may propose (e.g. :func:`frequent_tokens` of some text), or
    None for all. The draft's LM head is cut to those rows (a copy of them), so a draft step
    reads that much less: for a Llama-3-8B-shaped draft the 128k-row head is half of what a step
    reads. Greedy output is still exactly the target's and sampling still follows the target's
    distribution (the draft's proposal distribution is zero outside the ids); a target token
    outside them can only be produced as the round's own token, never accepted as a draft.
    compile / compile_mode: as for the Engine: the draft round and the verify round are compiled
    with :func:`~mambaify.generate.engine.compile_step`, once per (batch size, K, sampling
    settings), before their CUDA-graph capture. True insists (a failure raises
    :class:`~mambaify.generate.engine.CompileError`); "auto" compiles on CUDA and falls back to
    the eager rounds, with a warning and ``compile_error`` set, where compilation fails; False
    (the default) never compiles. ``compile_seconds`` adds up the time spent compiling;
    :meth:`is_compiled` says whether a setting's rounds run compiled.
    small_batch_linear: as for the Engine ("auto", the default: on CUDA for the Llama family's
    gated MLPs): both models' linear layers through :func:`mambaify.ops.small_batch_linear` (a
    verify call at batch b has b * (K + 1) rows, a draft step b or 2b).
    prefill_pad_slots: as for the Engine (both models' caches hold that many more slots).
    fold_norms: as for the Engine, for both models' verify calls and draft steps.

    The text helpers (generate_text, stream_text, chat, stream_chat) work as the Engine's.
    After each request, ``stats`` holds its :class:`SpeculativeStats`.
    """

    def __init__(
        self,
        target: nn.Module,
        draft: nn.Module,
        tokenizer=None,
        *,
        k: KChoice = 4,
        k_choices: Sequence[int] = DEFAULT_K_CHOICES,
        max_batch_size: int = 8,
        max_length: int = 2048,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        use_cuda_graph: bool | Literal["auto"] = "auto",
        store_states: bool = False,
        compile: bool | Literal["auto"] = False,
        compile_mode: str = "default",
        draft_vocab: Sequence[int] | torch.Tensor | None = None,
        small_batch_linear: bool | Literal["auto"] = "auto",
        prefill_pad_slots: int | None = None,
        fold_norms: bool | None = None,
    ):
        if max_batch_size < 1 or max_length < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_length >= 2, got {max_batch_size} and {max_length}")
        check_compile_options(compile, compile_mode)
        self.k = _check_k(k)
        self.k_choices = sorted({_check_k(c) for c in k_choices})
        if not self.k_choices:
            raise ValueError("k_choices must hold at least one K")
        if device is not None or dtype is not None:
            target.to(device=device, dtype=dtype)
            draft.to(device=device, dtype=dtype)
        self.device = target.lm_head.weight.device
        self.dtype = target.lm_head.weight.dtype
        if draft.lm_head.weight.device != self.device:
            raise ValueError(
                f"the draft is on {draft.lm_head.weight.device} and the target on {self.device}; "
                "move both to one device (or pass device=)"
            )
        self.model, self.draft_model, self.tokenizer = target, draft, tokenizer
        self.max_batch_size, self.max_length = max_batch_size, max_length
        self.k_max = max([*self.k_choices, self.k] if self.k != "auto" else self.k_choices)

        # A round writes K + 1 slots past the committed ones, which stay below max_length + K;
        # pad_slots more take a short prompt's padding up to a graphed prefill width.
        self.pad_slots = pad_slots_for(self.device, use_cuda_graph, prefill_pad_slots)
        slots = max_length + self.pad_slots + self.k_max + 1
        self.small_batch_linear = small_batch_linear = (
            resolve_small_batch_linear(small_batch_linear, target, self.device)
            and resolve_small_batch_linear(small_batch_linear, draft, self.device))
        linear = few_row_linear if small_batch_linear else module_linear
        fold = fold_norms_default() if fold_norms is None else fold_norms
        self.target_stack = SpeculativeStack(target, slots, self.k_max + 1, linear, fold)
        self.draft_stack = SpeculativeStack(draft, slots, self.k_max + 1, linear, fold)
        self.vocab_size = self.target_stack.vocab_size
        self.draft_vocab = self._cut_draft_head(draft, draft_vocab)
        target_dtype, draft_dtype = target.lm_head.weight.dtype, draft.lm_head.weight.dtype
        self.target_cache = self.target_stack.allocate_speculative(
            max_batch_size, target_dtype, self.device, store_states=store_states
        )
        self.draft_cache = self.draft_stack.allocate_speculative(max_batch_size, draft_dtype, self.device, draft=True)
        self.buffers = RoundBuffers.allocate(max_batch_size, self.k_max, self.device)
        # Two host copies of the report, one per round in flight (see _rounds), flat so that a
        # request's (batch, 5 + K) part is contiguous: a strided host copy would not run async.
        pinned = self.device.type == "cuda"
        self._host_reports = [torch.zeros(self.buffers.report.numel(), dtype=torch.long, pin_memory=pinned)
                              for _ in range(2)]
        self._report_slot = 0
        # Launch each round before reading the last one's outcome (on CUDA, where the host and the
        # device run apart; on the CPU, where nothing overlaps, tests may turn it on).
        self.launch_ahead = self.device.type == "cuda" and fast_path_enabled("MAMBAIFY_LAUNCH_AHEAD")
        self.step_range = torch.arange(self.k_max + 1, device=self.device)

        capturable = self.device.type == "cuda" and all(
            _rope_is_static(s.rotary_emb) for s in (self.target_stack, self.draft_stack)
        )
        if use_cuda_graph == "auto":
            self.use_cuda_graph = capturable
        elif use_cuda_graph and not capturable:
            raise ValueError("CUDA graphs need a CUDA device and a RoPE that does not depend on the positions seen")
        else:
            self.use_cuda_graph = bool(use_cuda_graph)
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        # Both models' prefills of a short prompt replay from one graph (GenerationFrontend).
        self._init_prefill_graphs()
        self.compile_setting = compile
        self.compile = self.device.type == "cuda" if compile == "auto" else bool(compile)
        self.compile_mode = compile_mode
        self.compile_error: str | None = None
        self.compile_seconds = 0.0
        self._programs: dict[tuple, RoundProgram] = {}
        self._times: dict[tuple, RoundTimes] = {}
        self._request: _Request | None = None
        self.stop_token_ids, self.pad_token_id = self._special_tokens()
        self.stats = SpeculativeStats()

    def _cut_draft_head(self, draft: nn.Module, draft_vocab) -> torch.Tensor | None:
        """The draft stack's LM head cut to ``draft_vocab``'s rows; the ids, sorted (None: all)."""
        if draft_vocab is None:
            return None
        ids = torch.as_tensor(draft_vocab, dtype=torch.long).flatten().unique()
        head = draft.lm_head
        limit = min(self.vocab_size, head.weight.shape[0])
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= limit:
            raise ValueError(
                f"draft_vocab must hold token ids in [0, {limit}) (the target's and the draft's vocabulary), "
                f"got {ids.numel()} ids" + (f" from {int(ids[0])} to {int(ids[-1])}" if ids.numel() else "")
            )
        ids = ids.to(self.device)
        self.draft_stack.lm_head = cut_head(head, ids)
        return ids

    # --- building the round programs ------------------------------------------------------

    def _program(self, batch: int, k: int, sampling: SamplingParams) -> RoundProgram:
        key = (batch, k, sampling)
        if key not in self._programs:
            rounds = self._round_functions(batch, k, sampling)
            program = self._compiled_program(batch, k, rounds) if self.compile else None
            self._programs[key] = program or self._make_program(batch, k, *rounds)
        return self._programs[key]

    def _compiled_program(self, batch: int, k: int, rounds: tuple[Callable, Callable]) -> RoundProgram | None:
        """The rounds compiled (and captured), or None where that fails and compile is "auto"."""
        try:
            # compile_step runs each round once, as a capture's warm-up does: from reset rows, so
            # that every slot and count it reads stays in bounds, and before the request's prefill.
            self._reset_rows(batch)
            return self._make_program(batch, k, *compile_steps(self, rounds), compiled=True)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            compile_failed(self, err, "the speculative rounds")
            return None

    def _make_program(
        self, batch: int, k: int, draft_round: Callable, verify_round: Callable, compiled: bool = False
    ) -> RoundProgram:
        if self.use_cuda_graph:
            self._reset_rows(batch)  # capture's warm-up runs the rounds: keep them in bounds
            draft_round, verify_round = GraphedStep(draft_round, self._pool), GraphedStep(verify_round, self._pool)
        return RoundProgram(k, draft_round, verify_round, compiled)

    def is_compiled(self, batch_size: int, k: int, *, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0) -> bool:
        """Whether requests of ``batch_size`` rows at K = ``k`` with these sampling settings run
        compiled rounds (False before the first such request)."""
        program = self._programs.get((batch_size, k, SamplingParams(temperature, top_k, top_p)))
        return program is not None and program.compiled

    def round_times(self, batch_size: int, k: int, *, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0) -> dict[str, float] | None:
        """Recent rounds of this setting, in milliseconds (moving averages over the requests so
        far; None before the first): the draft round and the verify round on the device (CUDA
        events; wall clock on the CPU), and the host's time between rounds, which launch_ahead
        hides. A round's wall time well above draft + verify means the host sets the pace."""
        times = self._times.get((batch_size, SamplingParams(temperature, top_k, top_p)))
        if times is None or k not in times.verify:
            return None
        return dict(draft_ms=1e3 * times.draft[k], verify_ms=1e3 * times.verify[k],
                    host_gap_ms=1e3 * (times.overhead or 0.0))

    def _reset_rows(self, batch: int) -> None:
        for cache in (self.target_cache, self.draft_cache):
            for t in (cache.lengths, cache.counts, cache.pad_lengths):
                t[:batch].zero_()
        self.buffers.active[:batch].zero_()  # nothing commits
        self.buffers.generated[:batch].zero_()

    def _round_functions(self, b: int, k: int, sampling: SamplingParams) -> tuple[Callable, Callable]:
        """The draft round and the verify round for the first b rows at K = k: fixed shapes, no
        host reads, every result in a persistent buffer."""
        rb = self.buffers
        if not sampling.greedy and rb.q is None:
            rb.q = torch.zeros(self.max_batch_size, self.k_max, self.vocab_size, device=self.device)
        target_cache, draft_cache = self.target_cache.rows(b), self.draft_cache.rows(b)
        last, drafts, active, generated = rb.last[:b], rb.drafts[:b, :k], rb.active[:b], rb.generated[:b]
        prev, prev_real = rb.prev[:b], rb.prev_real[:b]
        uniforms = rb.uniforms[:b]
        q = rb.q[:b, :k] if rb.q is not None else None
        steps = self.step_range[: k + 1]
        k_max, pad = self.k_max, self.pad_token_id

        vocab = self.draft_vocab  # a cut draft head: its logits are over these ids

        def draft_round() -> None:
            token = torch.stack([prev, last], 1)
            for i in range(k):
                logits = self.draft_stack.draft_step(token, i, draft_cache, prev_real)
                if vocab is None:
                    logits = fit_vocabulary(logits, self.vocab_size)
                if sampling.greedy:
                    chosen = greedy_tokens(logits)
                else:
                    dist = token_distribution(logits, sampling)
                    if vocab is None:
                        q[:, i].copy_(dist)
                    else:  # the proposal distribution on the whole vocabulary: zero off the ids
                        q[:, i].zero_()
                        q[:, i].index_copy_(1, vocab, dist)
                    chosen = sample_inverse_cdf(dist, uniforms[:, i])
                if vocab is not None:
                    chosen = vocab[chosen]
                drafts[:, i].copy_(chosen)
                token = chosen[:, None]

        def verify_round() -> None:
            tokens = torch.cat([last[:, None], drafts], 1)
            logits = self.target_stack.verify(tokens, target_cache)
            if sampling.greedy:
                accepted, following = accept_greedy(drafts, logits)
            else:
                p = token_distribution(logits, sampling)
                accepted, following = rejection_rule(
                    drafts, p, q, uniforms[:, k_max : k_max + k], uniforms[:, 2 * k_max]
                )
            # The row's new tokens: its accepted drafts, then the target's token, cut after the
            # first stop token and at max_new_tokens; finished rows emit and commit nothing.
            emitted = torch.where(steps < accepted[:, None], torch.cat([drafts, drafts[:, :1]], 1), following[:, None])
            is_stop = (emitted[..., None] == rb.stop_ids).any(-1) & (steps <= accepted[:, None])
            first_stop = torch.where(is_stop.any(-1), is_stop.long().argmax(-1), k + 1)
            count = torch.minimum(torch.minimum(accepted, first_stop) + 1, rb.max_new - generated)
            count = torch.where(active, count, 0)
            # A row commits what it emits (count): a row that goes on emits all accepted + 1; one
            # that ends here (stop token, or its budget) commits no token past its last, so its
            # length stays within prompt + max_new_tokens and the rounds it sits out (they still
            # write K + 1 slots for every row) stay inside the cache.
            for cache in (target_cache, draft_cache):
                cache.lengths.add_(count)
                cache.counts.copy_(count)
            generated.add_(count)
            still_active = active & (first_stop >= count) & (generated < rb.max_new)
            rb.report[:b, :4].copy_(torch.stack([active.long(), accepted, count, still_active.long()], 1))
            rb.report[:b, 4 : 5 + k].copy_(emitted.masked_fill(steps >= count[:, None], pad))
            # The draft's next first input: the newest committed token, which it has not run
            # (dK) or runs again at the same slot (the draft is one token behind).
            newest = tokens.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
            prev.copy_(torch.where(count > 0, newest, prev))
            prev_real.fill_(True)
            last.copy_(torch.where(active, following, last))
            active.copy_(still_active)

        return draft_round, verify_round

    # --- one request ----------------------------------------------------------------------

    def _resolve_k(self, k: KChoice | None) -> list[int]:
        k = self.k if k is None else _check_k(k)
        if k == "auto":
            return [c for c in self.k_choices if c <= self.k_max]
        if k > self.k_max:
            raise ValueError(f"k={k} exceeds the engine's largest K ({self.k_max}); make the engine with k={k}")
        return [k]

    @torch.no_grad()
    def _rounds(
        self,
        prompts: Prompts,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        sampling: SamplingParams,
        seed: int | None,
        stop_token_ids: Sequence[int] | None,
        k: KChoice | None,
    ) -> Iterator[list[_RoundReport]]:
        """Run one request, yielding each round's per-row outcome."""
        ks = self._resolve_k(k)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids, attention_mask = self._batch(prompts, attention_mask)
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt width {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                f"engine's max_length={self.max_length}"
            )
        stop = self._stop_ids(stop_token_ids)
        if len(stop) > STOP_SLOTS:
            raise ValueError(f"at most {STOP_SLOTS} stop token ids, got {len(stop)}")
        b = input_ids.shape[0]
        times = self._times.setdefault((b, sampling), RoundTimes())
        new_programs = [kk for kk in ks if (b, kk, sampling) not in self._programs]
        programs = {kk: self._program(b, kk, sampling) for kk in ks}  # captures come before the prefill
        if self.use_cuda_graph and len(ks) > 1:
            self._calibrate([programs[kk] for kk in new_programs], b, times)
        chooser = AdaptiveK(ks, times) if len(ks) > 1 else None
        generator = None  # greedy rounds draw no random numbers
        if not sampling.greedy:
            if seed is None:  # follow torch's global seed, as transformers' sampling does
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)

        # The prompt's last token is the first round's first input, which yields the first new token.
        started = time.perf_counter()
        request = self._request = _Request(b)
        # A short prompt: padded to a graphed width, both prefills replayed from one graph.
        bucket = self.prefill_bucket(b, input_ids.shape[1], max_new_tokens)
        if bucket is not None:
            input_ids, attention_mask = left_pad(input_ids, attention_mask, bucket, self.pad_token_id)
        target_rows, draft_rows = self.target_cache.rows(b), self.draft_cache.rows(b)
        pad = self.pad_token_id

        def start(ids: torch.Tensor, mask: torch.Tensor) -> None:
            self.target_stack.start(ids[:, :-1], mask[:, :-1], target_rows)
            # The draft, one token behind, stops before the prompt's last two tokens; the pad
            # column in front gives a one-token prompt a (pad) second-to-last token.
            draft_ids, draft_mask = F.pad(ids, (1, 0), value=pad), F.pad(mask, (1, 0), value=0)
            self.draft_stack.start(draft_ids[:, :-2], draft_mask[:, :-2], draft_rows)
            draft_rows.pad_lengths.copy_((draft_mask[:, :-1] == 0).sum(-1))  # a pad prev is padding too

        if bucket is None:
            start(input_ids, attention_mask)
        else:
            self.graphed_prefill((b, bucket), start, input_ids, attention_mask)
        draft_ids = F.pad(input_ids, (1, 0), value=pad)
        draft_mask = F.pad(attention_mask, (1, 0), value=0)
        rb = self.buffers
        rb.prev[:b].copy_(draft_ids[:, -2])
        rb.prev_real[:b].copy_(draft_mask[:, -2].bool())
        rb.last[:b].copy_(input_ids[:, -1])
        rb.generated[:b].zero_()
        rb.active[:b].fill_(True)
        rb.max_new.fill_(max_new_tokens)
        rb.stop_ids.fill_(-1)
        rb.stop_ids[: len(stop)] = torch.tensor(stop, dtype=torch.long, device=self.device)
        stats = self.stats = SpeculativeStats()
        clock = Clock(self.device)
        # Rounds are launched one ahead of the report the host reads (launch_ahead): round n + 1
        # runs on the device while the host reads round n's outcome and yields it, so the device
        # does not wait for the host between rounds. Everything a round needs from the last one
        # is in device buffers; only the choice of K lags a round behind. One more round is
        # launched only where it may still emit: unless a stop token may end the rows, not once
        # every running row's last known budget fits in the round in flight.
        remaining = [max_new_tokens] * b

        def launch() -> _InFlight:
            return self._launch(programs[chooser.choose() if chooser else ks[0]], b, generator, clock)

        in_flight = [launch()]
        previous_end = None
        while True:
            if request is not self._request:
                raise RuntimeError("another request started on this engine while this one was being decoded")
            current = in_flight[0]
            budget_left = max((r for r in remaining if r > 0), default=0) > current.program.k + 1
            if self.launch_ahead and len(in_flight) == 1 and (stop or budget_left):
                in_flight.append(launch())
            report = current.read()  # the round's one wait for the device
            # The device's idle time between the previous round and this one stands for the host's
            # overhead per round (all of it when rounds wait for the host, little when they do not).
            gap = clock.seconds(previous_end, current.start) if previous_end is not None else 0.0
            draft_s, verify_s = clock.seconds(current.start, current.middle), clock.seconds(current.middle, current.end)
            times.observe(current.program.k, draft_s, verify_s, draft_s + verify_s + gap)
            previous_end = current.end
            in_flight.pop(0)
            rows = [_RoundReport(bool(r[0]), r[1], r[4 : 4 + r[2]], bool(r[3])) for r in report]
            for i, row in enumerate(rows):
                remaining[i] = remaining[i] - len(row.tokens) if row.still_active else 0
            accepted = [row.accepted for row in rows if row.was_active]
            if chooser:
                chooser.observe(current.program.k, accepted)
            stats.observe(current.program.k, accepted, sum(len(row.tokens) for row in rows))
            stats.seconds = time.perf_counter() - started
            yield rows
            if not any(row.still_active for row in rows):
                return  # a round still in flight commits nothing: every row has finished
            if not in_flight:
                in_flight.append(launch())

    def _launch(self, program: RoundProgram, batch: int, generator: torch.Generator | None, clock) -> _InFlight:
        """Queue one round (its uniforms, when sampling: ``generator``; the draft round and the
        verify round) and the copy of its report to the host, without waiting for any of it."""
        rb = self.buffers
        if generator is not None:
            rb.uniforms[:batch].copy_(torch.rand(rb.uniforms[:batch].shape, generator=generator, device=self.device))
        start = clock.mark()
        program.draft()
        middle = clock.mark()
        program.verify()
        end = clock.mark()
        slot = self._report_slot = 1 - self._report_slot  # two rounds at most are in flight
        host = self._host_reports[slot][: batch * (5 + program.k)].view(batch, 5 + program.k)
        host.copy_(rb.report[:batch, : 5 + program.k], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return _InFlight(program, start, middle, end, host, event)

    def _calibrate(self, programs: list[RoundProgram], batch: int, times: RoundTimes, repeats: int = 3) -> None:
        """Time freshly captured programs before the request (their replays commit nothing), so
        that adaptive K starts from measured costs."""
        self._reset_rows(batch)
        for program in programs:
            for draft_s, verify_s, wall_s in self._timed_replays(program, batch, repeats):
                times.observe(program.k, draft_s, verify_s, wall_s)

    def _timed_replays(self, program: RoundProgram, batch: int, repeats: int) -> list[tuple[float, float, float]]:
        """(draft s, verify s, wall s) of ``repeats`` replays of a round, each read back before
        the next. The rows must be inactive (nothing commits), or the replays would decode."""
        clock = Clock(self.device)
        timings = []
        for _ in range(repeats):
            wall = time.perf_counter()
            run = self._launch(program, batch, None, clock)  # no new uniforms: nothing commits
            run.read()
            timings.append((clock.seconds(run.start, run.middle), clock.seconds(run.middle, run.end),
                            time.perf_counter() - wall))
        return timings

    def measure_rounds(self, batch_size: int, k: int, repeats: int = 10, *, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0) -> dict[str, float]:
        """The device time of one round at this batch size, K and sampling setting, in ms (median
        of ``repeats`` replays; CUDA events, or the host clock on the CPU): the draft round (K
        draft calls) and the verify round (the target over K + 1 tokens, acceptance, commit), as
        generate() runs them (captured, and compiled with compile=True). The rounds read the
        context the last request left in the caches: to time them at a C-token context, first
        generate from a C-token prompt at the same setting (a setting's first capture resets the
        rows, so one measured before any request reads an empty context). Nothing is committed
        (the rows are marked finished), and the next request starts afresh."""
        if k == "auto":
            raise ValueError("measure_rounds times one K: pass an integer k")
        (k,) = self._resolve_k(k)
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size must be in 1..{self.max_batch_size}, got {batch_size}")
        with torch.no_grad():
            program = self._program(batch_size, k, SamplingParams(temperature, top_k, top_p))
            self.buffers.active[:batch_size].zero_()  # nothing commits
            timings = self._timed_replays(program, batch_size, repeats)
        return dict(draft_ms=1e3 * statistics.median(t[0] for t in timings),
                    verify_ms=1e3 * statistics.median(t[1] for t in timings))

    # --- the public interface -------------------------------------------------------------

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
        k: KChoice | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield one list per step, as Engine.stream does: each row's new token, or None once
        the row has stopped. A round yields the steps that every running row has reached.

        Greedy (temperature 0) yields the target's own greedy tokens; sampling yields tokens
        distributed as the target's (temperature, top-k, top-p), reproducibly for a seed at a
        fixed K. stop_token_ids default to the target's eos; a row emits its stop token, then None.
        """
        sampling = SamplingParams(temperature, top_k, top_p)
        pending: list[list[int]] | None = None
        running: list[bool] = []
        for rows in self._rounds(prompts, attention_mask, max_new_tokens, sampling, seed, stop_token_ids, k):
            if pending is None:
                pending = [[] for _ in rows]
            for queue, row in zip(pending, rows):
                queue.extend(row.tokens)
            running = [row.still_active for row in rows]
            while all(queue or not on for queue, on in zip(pending, running)) and any(pending):
                yield [queue.pop(0) if queue else None for queue in pending]
        while pending and any(pending):  # the last round's rest: every row has stopped
            yield [queue.pop(0) if queue else None for queue in pending]

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
        k: KChoice | None = None,
    ) -> torch.Tensor:
        """The new tokens (batch, steps), as :meth:`stream` produces them; stopped rows hold the
        pad id. steps <= max_new_tokens: generation ends when every row has stopped."""
        steps = list(self.stream(
            prompts, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, k=k,
        ))
        pad = self.pad_token_id
        return torch.tensor([[pad if t is None else t for t in step] for step in steps], dtype=torch.long).T


def _check_k(k) -> KChoice:
    if k == "auto":
        return k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an integer >= 1 or 'auto', got {k!r}")
    return k


def parse_k(text: str) -> KChoice:
    """'4' -> 4, 'auto' -> 'auto' (for command lines)."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        return _check_k(int(text))
    except ValueError:
        raise ValueError(f"--k takes an integer >= 1 or 'auto', got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# The opt-in from a model


_ENGINE_ATTRIBUTE = "_mambaify_speculative_engine"
_LENGTH_QUANTUM = 256


def generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    k: KChoice = 4,
    **options,
) -> torch.Tensor:
    """The prompt then the new tokens (batch, width + steps) of speculative decoding of ``target``
    with ``draft`` (options as for SpeculativeEngine.generate; greedy by default). The engine is
    kept on the target and reused while it fits the request, as engine.generate does."""
    batch, width = input_ids.shape
    engine = _engine_for(target, draft, batch, width + max_new_tokens, k)
    new_tokens = engine.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, k=k, **options)
    return torch.cat([input_ids.to(new_tokens.device), new_tokens], dim=1)


def _engine_for(target: nn.Module, draft: nn.Module, batch_size: int, length: int, k: KChoice) -> SpeculativeEngine:
    engine: SpeculativeEngine | None = getattr(target, _ENGINE_ATTRIBUTE, None)
    weight = target.lm_head.weight
    needed_k = max(DEFAULT_K_CHOICES) if k == "auto" else k
    if (
        engine is None
        or engine.draft_model is not draft
        or engine.max_batch_size < batch_size
        or engine.max_length < length
        or engine.k_max < needed_k
        or (engine.device, engine.dtype) != (weight.device, weight.dtype)
    ):
        setattr(target, _ENGINE_ATTRIBUTE, None)  # let the old caches go before allocating new ones
        engine = SpeculativeEngine(
            target, draft, k=k, max_batch_size=batch_size,
            max_length=-(-length // _LENGTH_QUANTUM) * _LENGTH_QUANTUM,
        )
        setattr(target, _ENGINE_ATTRIBUTE, engine)
    return engine


# transformers' defaults for settings a generation config leaves unset (GenerationConfig docs).
_HF_DEFAULTS = dict(max_length=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0)
_SUPPORTED = {"input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
              "top_p", "eos_token_id", "pad_token_id", "num_assistant_tokens", "seed", "use_cache"}


def assisted_generate(
    model: nn.Module,
    assistant_model: nn.Module,
    inputs: torch.Tensor | None = None,
    generation_config=None,
    **kwargs,
) -> torch.Tensor:
    """``model.generate(input_ids, ..., assistant_model=draft, num_assistant_tokens=k)`` through
    the speculative engine: the prompt then the new tokens (batch, width + steps), finished rows
    padded with the pad id, as transformers returns them.

    Settings come from the keyword arguments, then ``generation_config`` (else the model's), then
    transformers' defaults: max_new_tokens / max_length, do_sample, temperature, top_k, top_p,
    eos_token_id, pad_token_id. num_assistant_tokens: K per round, an int or "auto" (default 4).
    seed: sampling seed (default: drawn from torch's global generator).
    """
    unknown = sorted(name for name, value in kwargs.items() if name not in _SUPPORTED and value is not None)
    if unknown:
        raise ValueError(
            f"generate(assistant_model=...) runs mambaify's speculative engine, which does not take "
            f"{', '.join(unknown)}; supported: {', '.join(sorted(_SUPPORTED))}"
        )
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("generate(assistant_model=...) needs input_ids")
    config = generation_config or getattr(model, "generation_config", None)

    def setting(name):
        value = kwargs.get(name)
        if value is None and config is not None:
            value = getattr(config, name, None)
        return _HF_DEFAULTS.get(name) if value is None else value

    width = input_ids.shape[1]
    max_new = kwargs.get("max_new_tokens")
    if max_new is None and kwargs.get("max_length") is None and config is not None:
        max_new = getattr(config, "max_new_tokens", None)
    if max_new is None:
        max_new = setting("max_length") - width
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new} (max_length counts the prompt's {width} tokens)")
    k = kwargs.get("num_assistant_tokens") or 4
    sample = bool(setting("do_sample"))
    options = dict(temperature=float(setting("temperature")), top_k=int(setting("top_k") or 0),
                   top_p=float(setting("top_p"))) if sample else {}
    eos = kwargs.get("eos_token_id")
    if eos is None and config is not None:
        eos = getattr(config, "eos_token_id", None)
    engine = _engine_for(model, assistant_model, input_ids.shape[0], width + max_new, k)
    pad = kwargs.get("pad_token_id")
    if pad is None and config is not None and getattr(config, "pad_token_id", None) is not None:
        pad = config.pad_token_id
    engine.pad_token_id = engine.pad_token_id if pad is None else int(pad)
    new_tokens = engine.generate(
        input_ids, kwargs.get("attention_mask"), max_new_tokens=max_new, seed=kwargs.get("seed"),
        stop_token_ids=[] if eos is None else eos, k=k, **options,
    )
    return torch.cat([input_ids.to(new_tokens.device), new_tokens], dim=1)


__all__ = [
    "AdaptiveK",
    "MambaVerifyBuffers",
    "RoundTimes",
    "SpeculativeCache",
    "SpeculativeEngine",
    "SpeculativeStack",
    "SpeculativeStats",
    "accepted_at",
    "assisted_generate",
    "DRAFT_VOCAB_FILE",
    "cut_head",
    "frequent_tokens",
    "generate",
    "mamba_draft_step",
    "mamba_verify",
    "parse_k",
    "saved_draft_vocab",
    "token_distribution",
]
