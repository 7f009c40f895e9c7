"""Speculative decoding for hybrids and pure Mamba2 models: the CPU reference (PAPER.md section 3).

A draft model proposes K tokens per row; the target verifies them in one call over K + 1 tokens
(the last committed token, then the K drafts) and keeps, per row, the longest accepted prefix
plus one token of its own. Rows of a batch accept different numbers of tokens, so every
per-row quantity below (lengths, positions, accepted counts, conv window offsets) is a tensor.

Attention layers verify the K + 1 tokens in parallel over a padded KV buffer and "truncate" on
rejection by not advancing the row's length: the rejected slots are beyond the causal mask and
are overwritten next round.

Mamba layers have nothing to truncate, so, as in the paper, each keeps
  * ONE checkpointed SSM state, at the last token folded in;
  * the per-token inputs (x after conv + SiLU repeated to heads, dt after softplus, B after the
    conv) of the last verify call, of which the first ``pending[b]`` were accepted;
  * a conv window: the d_conv - 1 raw conv inputs before the last call, then its K + 1 inputs.
A verify call first *replays* the accepted cached inputs into the checkpoint (tokens beyond a
row's count get dt = 0: decay 1, nothing written) and slides the conv window by the same count,
then runs the new tokens from there, emitting outputs and caching their inputs, without storing
any per-token state. Nothing is undone on rejection: the next call just replays fewer tokens.

This is plain PyTorch (float32 / float64) and runs the model's own modules; the fused
replay + multi-step kernel, CUDA graphs and the engine's static caches are left to faster paths.

Reading order: MambaVerifyState / mamba_fold / mamba_verify -> attention_verify ->
TargetState / target_prefill / target_verify / target_commit -> propose_draft ->
accept_greedy / accept_rejection -> speculative_generate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cache import MambaLayerCache
from ..models.modeling import Mamba2Mixer
from ..ops.reference import causal_conv1d, slide_conv_window, ssd_fold, ssd_sequential
from .engine import grouped_query_attention
from .sampling import greedy_tokens

# ---------------------------------------------------------------------------------------------
# Mamba layers: one checkpoint + cached inputs


@dataclass
class MambaVerifyState:
    """One Mamba layer's verification state (b rows, t tokens of the last verify call).

    checkpoint (b,h,n,p): the SSM state after the last folded-in token, in the scan's compute dtype.
    x (b,t,h,p), dt (b,t,h), B (b,t,h,n): the last call's per-token inputs (C is not needed to replay).
    window (b, d_conv-1+t, conv_dim): raw conv inputs, the history before the last call then its t tokens.
    """

    checkpoint: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    window: torch.Tensor


def mamba_empty_state(mixer: Mamba2Mixer, batch: int, dtype: torch.dtype, device) -> MambaVerifyState:
    """The state before any token: zero checkpoint, no cached inputs, a zero conv history."""
    h, p, n = mixer.num_heads, mixer.head_dim, mixer.d_state
    cdt = torch.promote_types(dtype, torch.float32)
    return MambaVerifyState(
        checkpoint=torch.zeros(batch, h, n, p, dtype=cdt, device=device),
        x=torch.zeros(batch, 0, h, p, dtype=dtype, device=device),
        dt=torch.zeros(batch, 0, h, dtype=dtype, device=device),
        B=torch.zeros(batch, 0, h, n, dtype=dtype, device=device),
        window=torch.zeros(batch, mixer.d_conv - 1, mixer.conv_dim, dtype=dtype, device=device),
    )


def mamba_prefill(
    mixer: Mamba2Mixer, hidden: torch.Tensor, padding_mask: torch.Tensor
) -> tuple[torch.Tensor, MambaVerifyState]:
    """Run a left-padded prompt through the mixer's own forward; its final state becomes the checkpoint."""
    fresh = MambaLayerCache()
    out = mixer(hidden, padding_mask, None, fresh)
    state = mamba_empty_state(mixer, hidden.shape[0], hidden.dtype, hidden.device)
    state.checkpoint = fresh.ssm_state
    state.window = fresh.conv_state.transpose(1, 2).contiguous()
    return out, state


def mamba_fold(mixer: Mamba2Mixer, state: MambaVerifyState, counts: torch.Tensor) -> None:
    """Replay last call's accepted tokens into the checkpoint and the conv history, in place."""
    # Tokens past a row's count are not folded (ssd_fold zeroes them: decay 1, nothing written).
    state.checkpoint = ssd_fold(state.checkpoint, state.x, state.dt, state.B, counts, mixer.A).to(state.checkpoint.dtype)
    state.window = slide_conv_window(state.window, counts, mixer.d_conv)
    state.x, state.dt, state.B = state.x[:, :0], state.dt[:, :0], state.B[:, :0]


def mamba_verify(
    mixer: Mamba2Mixer, hidden: torch.Tensor, state: MambaVerifyState, counts: torch.Tensor
) -> torch.Tensor:
    """One Mamba layer's verify call: (a) fold last call's counts[b] accepted tokens into the
    checkpoint, (b) run the new tokens (b, t, d) from it and cache their inputs. Returns the
    layer's output (b, t, d); the checkpoint is not advanced past the folded tokens."""
    mamba_fold(mixer, state, counts)
    b, t, _ = hidden.shape
    z, xBC, dt = mixer.project(hidden)
    history = state.window
    conv, _ = causal_conv1d(xBC, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, history.transpose(1, 2))
    x, B, C = mixer.split_heads(F.silu(conv))
    dt = F.softplus(dt + mixer.dt_bias)
    # The outputs need every token's state, but only as a transient: the scan's final state is dropped.
    y, _ = ssd_sequential(x, dt, mixer.A, B, C, mixer.D, initial_state=state.checkpoint)
    state.x, state.dt, state.B = x, dt, B
    state.window = torch.cat([history, xBC], dim=1)
    return mixer.out_proj(mixer.norm(y.reshape(b, t, mixer.d_inner), z))


# ---------------------------------------------------------------------------------------------
# Attention layers: a padded KV buffer with per-row lengths


@dataclass
class KVState:
    """Keys (RoPE applied) and values of one attention layer, (b, kv_heads, capacity, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class Placement:
    """Where one forward pass's tokens go, shared by all layers.

    slots, positions (b, t): each token's cache slot and RoPE position, per row.
    key_valid (b, S), key_pos (b, S): which slots hold a real token, and its position.
    rotary: (cos, sin) at the tokens' positions.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    key_valid: torch.Tensor
    key_pos: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """(b, 1, t, S) bool: a query sees the valid slots up to its own, and always itself (so a
        padding query has a key and no NaN appears)."""
        key_slot = torch.arange(self.key_valid.shape[1], device=self.slots.device)
        causal = key_slot[None, None, :] <= self.slots[:, :, None]
        mask = causal & self.key_valid[:, None, :]
        if sliding_window is not None:
            mask = mask & (self.positions[:, :, None] - self.key_pos[:, None, :] < sliding_window)
        mask = mask | (key_slot[None, None, :] == self.slots[:, :, None])
        return mask[:, None]


def _kv_heads(attn: nn.Module) -> int:
    return attn.k_proj.out_features // attn.head_dim


def attention_verify(attn: nn.Module, hidden: torch.Tensor, kv: KVState, where: Placement) -> torch.Tensor:
    """A teacher-family attention over its KV buffer: write this pass's keys/values at each row's
    slots, then attend causally. Prefill and verify are the same call."""
    b, t, _ = hidden.shape
    heads = (b, t, -1, attn.head_dim)
    query = attn.q_proj(hidden).view(heads).transpose(1, 2)
    key = attn.k_proj(hidden).view(heads).transpose(1, 2)
    value = attn.v_proj(hidden).view(heads).transpose(1, 2)
    apply_rotary = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    query, key = apply_rotary(query, key, *where.rotary)
    index = where.slots[:, None, :, None].expand(b, key.shape[1], t, attn.head_dim)
    kv.keys.scatter_(2, index, key)
    kv.values.scatter_(2, index, value)
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    out = grouped_query_attention(query, kv.keys, kv.values, where.mask(window), attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------
# The whole target


@dataclass
class TargetState:
    """The target's verification state. Slots are per row: row b's committed tokens (left padding
    included) fill slots 0..lengths[b]-1; ``pending[b]`` tokens of the last verify call were
    accepted and are not yet folded into the Mamba checkpoints."""

    layers: list[KVState | MambaVerifyState]
    lengths: torch.Tensor  # (b,) long
    next_pos: torch.Tensor  # (b,) long: the RoPE position of row b's next token
    key_valid: torch.Tensor  # (b, capacity) bool
    key_pos: torch.Tensor  # (b, capacity) long
    pending: torch.Tensor  # (b,) long


def _mixer(layer: nn.Module) -> Mamba2Mixer | None:
    mamba = getattr(layer, "mamba", None)
    return mamba if isinstance(mamba, Mamba2Mixer) else None


def _run_layers(
    model: nn.Module, input_ids: torch.Tensor, state: TargetState, where: Placement, mamba_step: Callable
) -> torch.Tensor:
    """Embed, run every decoder layer (attention over its KV buffer, Mamba through ``mamba_step``), LM head."""
    base = model.model
    hidden = base.embed_tokens(input_ids)
    if any(_mixer(layer) is None for layer in base.layers):
        where.rotary = base.rotary_emb(hidden, where.positions)
    for i, layer in enumerate(base.layers):
        normed = layer.input_layernorm(hidden)
        mixer = _mixer(layer)
        if mixer is None:
            mixed = attention_verify(layer.self_attn, normed, state.layers[i], where)
        else:
            mixed = mamba_step(i, mixer, normed)
        hidden = hidden + mixed
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(base.norm(hidden))


def target_prefill(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int
) -> TargetState:
    """Run a left-padded prompt batch (b, T) from slot 0 (T may be 0) and return the state after it."""
    b, T = input_ids.shape
    device = input_ids.device
    dtype = model.lm_head.weight.dtype
    layers: list = []
    for layer in model.model.layers:
        mixer = _mixer(layer)
        if mixer is None:
            attn = layer.self_attn
            shape = (b, _kv_heads(attn), capacity, attn.head_dim)
            # Zeros, not empty: masked slots still enter the matmul, and a NaN would survive the mask.
            keys = torch.zeros(shape, dtype=dtype, device=device)
            layers.append(KVState(keys, torch.zeros_like(keys)))
        else:
            layers.append(mamba_empty_state(mixer, b, dtype, device))
    mask = attention_mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    key_valid = torch.zeros(b, capacity, dtype=torch.bool, device=device)
    key_pos = torch.zeros(b, capacity, dtype=torch.long, device=device)
    key_valid[:, :T] = mask
    key_pos[:, :T] = positions
    state = TargetState(
        layers, torch.full((b,), T, device=device), mask.sum(-1), key_valid, key_pos,
        torch.zeros(b, dtype=torch.long, device=device),
    )
    if T == 0:
        return state
    slots = torch.arange(T, device=device)[None].expand(b, T)
    where = Placement(slots, positions, key_valid, key_pos, None)

    def prefill_mamba(i, mixer, normed):
        out, state.layers[i] = mamba_prefill(mixer, normed, attention_mask)
        return out

    _run_layers(model, input_ids, state, where, prefill_mamba)
    return state


def target_verify(model: nn.Module, tokens: torch.Tensor, state: TargetState) -> torch.Tensor:
    """Verify tokens (b, t) (the last committed token then the drafts) in one call -> logits (b, t, V).

    Each row's tokens go to its own slots lengths[b].. and positions next_pos[b]..; the Mamba
    layers first fold in the last call's ``pending`` accepted tokens. Commit with target_commit.
    """
    b, t = tokens.shape
    steps = torch.arange(t, device=tokens.device)[None]
    slots = state.lengths[:, None] + steps
    positions = state.next_pos[:, None] + steps
    state.key_valid.scatter_(1, slots, True)
    state.key_pos.scatter_(1, slots, positions)
    where = Placement(slots, positions, state.key_valid, state.key_pos, None)

    def verify_mamba(i, mixer, normed):
        return mamba_verify(mixer, normed, state.layers[i], state.pending)

    logits = _run_layers(model, tokens, state, where, verify_mamba)
    state.pending = torch.zeros_like(state.pending)  # folded in by every Mamba layer
    return logits


def target_commit(state: TargetState, counts: torch.Tensor) -> None:
    """Keep the first counts[b] tokens of the last verify call in row b. Attention: advancing the
    length truncates the rest (they lie past every later query's causal mask and are overwritten).
    Mamba: the count is replayed into the checkpoints at the next verify call."""
    state.lengths = state.lengths + counts
    state.next_pos = state.next_pos + counts
    state.pending = counts.clone()


def fold_pending(model: nn.Module, state: TargetState) -> None:
    """Fold the pending accepted tokens into every Mamba checkpoint now (for inspection and tests)."""
    for layer, layer_state in zip(model.model.layers, state.layers):
        mixer = _mixer(layer)
        if mixer is not None:
            mamba_fold(mixer, layer_state, state.pending)
    state.pending = torch.zeros_like(state.pending)


# ---------------------------------------------------------------------------------------------
# The draft: any causal LM with the same vocabulary, recomputed from scratch each round


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


@torch.no_grad()
def propose_draft(
    draft: nn.Module, rows: list[list[int]], k: int, do_sample: bool, temperature: float,
    generator: torch.Generator, pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K draft tokens per row (b, k), and when sampling the draft distributions q (b, k, V) they
    were drawn from. No cache: the whole left-padded batch is re-run for each token (simplest
    correct; the draft's cost is not what this reference measures)."""
    device = draft.lm_head.weight.device
    rows = [list(r) for r in rows]
    tokens, dists = [], []
    for _ in range(k):
        ids, mask = _left_pad(rows, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = draft(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        if do_sample:
            q = _probs(logits, temperature)
            nxt = torch.multinomial(q, 1, generator=generator)[:, 0]
            dists.append(q)
        else:
            nxt = logits.argmax(-1)
        tokens.append(nxt)
        for row, tok in zip(rows, nxt.tolist()):
            row.append(tok)
    return torch.stack(tokens, 1), (torch.stack(dists, 1) if do_sample else None)


# ---------------------------------------------------------------------------------------------
# Acceptance rules: (drafts (b,k), target logits (b,k+1,V), q, ...) -> (accepted (b,), next (b,))


def accept_greedy(drafts: torch.Tensor, logits: torch.Tensor, *_args) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest prefix of drafts matching the target's argmax, then the target's next token."""
    best = greedy_tokens(logits)  # (b, k+1): best[:, i] follows input i
    match = (drafts == best[:, :-1]).long()
    accepted = match.cumprod(-1).sum(-1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def accept_rejection(
    drafts: torch.Tensor, logits: torch.Tensor, q: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative sampling rule, so that the output is distributed as the target's:
    accept draft token d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
    sample from normalize(max(0, p_i - q_i)); if all K are accepted sample one more from p_K.
    The randomness comes from ``generator`` (on the logits' device); see :func:`rejection_rule`."""
    b, k = drafts.shape
    p = _probs(logits, temperature)  # (b, k+1, V)
    u = torch.rand(b, k + 1, generator=generator, dtype=p.dtype, device=p.device)
    return rejection_rule(drafts, p, q.to(p.dtype), u[:, :k], u[:, k])


def rejection_rule(
    drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u_accept: torch.Tensor, u_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`accept_rejection` given its uniforms, so that a CUDA graph can run it with random
    numbers drawn outside: fixed shapes, no host reads, no random number generator inside.

    drafts (b,k); p (b,k+1,V) the target's distributions after each input; q (b,k,V) the draft's
    distributions the drafts were drawn from; u_accept (b,k), u_next (b,) uniform in [0, 1).
    Returns (accepted (b,), next token (b,)).
    """
    b, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    ok = (u_accept * q_d < p_d).long()  # u < p/q without dividing by a tiny q
    accepted = ok.cumprod(-1).sum(-1)
    rows = torch.arange(b, device=drafts.device)
    p_at = p[rows, accepted]  # p_n: the distribution the next token comes from
    # q_K := 0, so that when all k are accepted the next token comes from p_K itself.
    q_at = q[rows, accepted.clamp(max=k - 1)] * (accepted < k)[:, None].to(q.dtype)
    residual = (p_at - q_at).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    # p == q gives an all-zero residual, but then rejection had probability 0; fall back to p.
    residual = torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p_at)
    return accepted, sample_inverse_cdf(residual, u_next)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (b, V) (need not sum to 1) for uniforms u (b,) in [0, 1): the
    first token whose cumulative probability exceeds u * total. A zero-probability token is
    never picked (its cumulative value equals its predecessor's)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    token = torch.searchsorted(cdf, u.to(cdf.dtype)[:, None] * total, right=True)[:, 0]
    # u * total can round up to the total itself: then take the last token the total is reached
    # at (the last with probability > 0), never one past it.
    last_possible = (cdf < total).sum(-1)
    return torch.minimum(token, last_possible)


# ---------------------------------------------------------------------------------------------
# The decoding loop


@dataclass
class SpeculativeStats:
    """rounds: verify calls. mean_accepted: draft tokens accepted per row and round (rows still
    generating). tokens_per_step = mean_accepted + 1 (the target's own token)."""

    rounds: int = 0
    accepted: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def tokens_per_step(self) -> float:
        return self.mean_accepted + 1.0


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    k: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    acceptance: Callable | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate max_new_tokens per row with ``draft`` proposing k tokens per round and ``target``
    (a hybrid, a pure Mamba2 model or a Llama-family teacher) verifying them in one call.

    input_ids (b, T) left-padded, attention_mask (b, T) (None: no padding), T >= 1.
    Greedy (do_sample=False) reproduces the target's greedy decoding; sampling follows the
    rejection rule, so tokens are distributed as the target's at ``temperature``.
    ``acceptance`` replaces the rule (tests use it to show that a wrong rule is detected).
    Returns the new tokens (b, max_new_tokens) and :class:`SpeculativeStats`. No EOS stopping.
    """
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"need k >= 1 and max_new_tokens >= 1, got {k} and {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    b, T = input_ids.shape
    generator = torch.Generator().manual_seed(seed)
    rule = acceptance or (accept_rejection if do_sample else accept_greedy)
    pad_id = getattr(target.config, "pad_token_id", None) or 0

    # The prompt's last token is fed by the first verify call, which then yields the first new token.
    # Capacity: a row's length stays below T + max_new_tokens + k, and a call writes k + 1 more slots.
    state = target_prefill(target, input_ids[:, :-1], attention_mask[:, :-1], T + max_new_tokens + 2 * k + 2)
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    new: list[list[int]] = [[] for _ in range(b)]
    last = input_ids[:, -1]
    stats = SpeculativeStats()
    while min(len(n) for n in new) < max_new_tokens:
        active = torch.tensor([len(n) < max_new_tokens for n in new])
        drafts, q = propose_draft(draft, rows, k, do_sample, temperature, generator, pad_id)
        logits = target_verify(target, torch.cat([last[:, None], drafts], 1), state)
        accepted, nxt = rule(drafts, logits.double(), q, temperature, generator)
        # Finished rows commit nothing, so their state and buffers stop growing.
        target_commit(state, torch.where(active, accepted + 1, 0))
        stats.rounds += 1
        for i, (is_active, n, row_drafts, tok) in enumerate(
            zip(active.tolist(), accepted.tolist(), drafts.tolist(), nxt.tolist())
        ):
            if is_active:
                kept = row_drafts[:n] + [tok]
                rows[i] += kept
                new[i] += kept
                stats.accepted.append(n)
        last = torch.where(active, nxt, last)
    return torch.tensor([n[:max_new_tokens] for n in new], dtype=torch.long), stats


__all__ = [
    "MambaVerifyState",
    "SpeculativeStats",
    "TargetState",
    "accept_greedy",
    "accept_rejection",
    "fold_pending",
    "mamba_fold",
    "mamba_verify",
    "propose_draft",
    "rejection_rule",
    "sample_inverse_cdf",
    "speculative_generate",
    "target_commit",
    "target_prefill",
    "target_verify",
]
