"""The Mamba2 (SSD) scan and the causal depthwise conv in plain PyTorch.

These functions *define* what every faster backend must compute, and they are the CPU path.

Shapes (one letter each): b batch, t time, h SSM heads, p head dim (the value width),
n state size (the key width). Per head the state ``S`` is an ``n x p`` matrix and

    S_t = exp(dt_t * A) * S_{t-1} + B_t (dt_t * x_t)^T        (decay, then write)
    y_t = S_t^T C_t + D * x_t                                    (read)

which is causal linear attention with q = C, k = B, v = dt * x and a scalar log-decay
g = dt * A per head and step. ``reset[b, t]`` marks the first token of a new document in a
packed row: the state is cleared *before* that token is written (its decay is exp(-inf) = 0).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _no_autocast(fn):
    """Run the scan in its own compute dtype even inside a bf16 autocast region: decays are
    products of many factors and lose too much if the matmuls round them to bf16."""

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision cumulative sums of decays lose too much; accumulate in float32 at least.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _log_decay(dt: torch.Tensor, A: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    g = dt * A  # (b, t, h)
    if reset is not None:
        g = g.masked_fill(reset[..., None], float("-inf"))
    return g


@_no_autocast
def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one step at a time: the definition the other forms are tested against.

    x (b,t,h,p), dt (b,t,h) (already softplus-ed), A (h) (negative), B and C (b,t,h,n),
    D (h) or None, initial_state (b,h,n,p) or None, reset (b,t) bool or None.
    Returns y (b,t,h,p) in x's dtype and the final state (b,h,n,p) in the compute dtype.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    cdt = _compute_dtype(x)
    x_, dt_, B_, C_ = (v.to(cdt) for v in (x, dt, B, C))
    g = _log_decay(dt_, A.to(cdt), reset)
    state = (
        initial_state.to(cdt)
        if initial_state is not None
        else x_.new_zeros(b, h, n, p)
    )
    ys = []
    for i in range(t):
        decay = torch.exp(g[:, i])[..., None, None]  # (b,h,1,1)
        write = B_[:, i, :, :, None] * (dt_[:, i, :, None] * x_[:, i])[:, :, None, :]
        state = decay * state + write
        ys.append(torch.einsum("bhn,bhnp->bhp", C_[:, i], state))
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x_
    return y.to(x.dtype), state


def segsum(g: torch.Tensor) -> torch.Tensor:
    """seg[..., i, j] = g[j+1] + ... + g[i] for i >= j, and -inf above the diagonal.

    Built by a masked cumulative sum rather than as cumsum[i] - cumsum[j], so that a -inf
    (a document reset) never meets another -inf in a subtraction, and no precision is lost
    to cancellation.
    """
    T = g.shape[-1]
    g = g[..., None].expand(*g.shape, T)  # g[..., i, j] = g_i
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)
    seg = g.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(0)
    return seg.masked_fill(~lower, float("-inf"))


@_no_autocast
def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`ssd_sequential`, computed chunk by chunk (the SSD algorithm).

    Inside a chunk the output is a masked, decayed attention-like product (matmuls); between
    chunks only the n x p states travel. Differentiable, so it is also the CPU training path.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    cdt = _compute_dtype(x)
    L = chunk_size
    pad = (-t) % L
    x_, dt_, B_, C_ = (v.to(cdt) for v in (x, dt, B, C))
    g = _log_decay(dt_, A.to(cdt), reset)
    u = x_ * dt_[..., None]  # the value stream, v = dt * x
    if pad:
        # Trailing padding has decay exp(0) = 1 and writes nothing: the final state is unchanged.
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        g = F.pad(g, (0, 0, 0, pad))
        B_ = F.pad(B_, (0, 0, 0, 0, 0, pad))
        C_ = F.pad(C_, (0, 0, 0, 0, 0, pad))
    c = (t + pad) // L
    u = u.reshape(b, c, L, h, p)
    B_ = B_.reshape(b, c, L, h, n)
    C_ = C_.reshape(b, c, L, h, n)
    g = g.reshape(b, c, L, h).permute(0, 3, 1, 2)  # (b, h, c, L)

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(g_{j+1} + ... + g_i) u_j.
    decay_in = torch.exp(segsum(g))  # (b, h, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", C_, B_) * decay_in
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, u)

    # 2. What each chunk writes into the state, decayed to the chunk's end.
    decay_to_end = decay_in[..., -1, :]  # (b, h, c, L): exp(g_{j+1} + ... + g_{L-1})
    chunk_states = torch.einsum("bhcl,bclhn,bclhp->bchnp", decay_to_end, B_, u)

    # 3. Carry the states across chunks: S_c = exp(sum g in chunk c) S_{c-1} + chunk_states_c.
    if initial_state is None:
        initial_state = x_.new_zeros(b, h, n, p)
    states = torch.cat([initial_state.to(cdt)[:, None], chunk_states], dim=1)  # (b, c+1, h, n, p)
    chunk_total = g.sum(dim=-1)  # (b, h, c)
    decay_chunks = torch.exp(segsum(F.pad(chunk_total, (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchnp->bzhnp", decay_chunks, states)
    state_before, final_state = states[:, :-1], states[:, -1]

    # 4. What the state entering each chunk contributes: C_i^T exp(g_0 + ... + g_i) S_{c-1}.
    decay_from_start = torch.exp(torch.cumsum(g, dim=-1))  # (b, h, c, L)
    y_off = torch.einsum("bclhn,bchnp,bhcl->bclhp", C_, state_before, decay_from_start)

    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :t]
    if D is not None:
        y = y + D.to(cdt)[:, None] * x_
    return y.to(x.dtype), final_state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x (b,h,p), dt (b,h), B and C (b,h,n), state (b,h,n,p). Returns (y, new state)."""
    y, new_state = ssd_sequential(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D, initial_state=state
    )
    return y[:, 0], new_state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama family's RMSNorm (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm): x scaled by
    rsqrt(mean(x^2) + eps) in float32, rounded back to x's dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Mamba2's gated RMSNorm over the last dim: weight * RMSNorm(y * silu(z)), computed in float32
    (float64 for float64 inputs), rounded back to y's dtype before the weight."""
    compute = torch.promote_types(y.dtype, torch.float32)
    h = y.to(compute) * F.silu(z.to(compute))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(y.dtype)


def pre_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x through the norm a small-batch linear layer folds in: none (``weight`` None), the
    Llama family's :func:`rms_norm`, or with ``gate`` Mamba2's :func:`gated_rms_norm`."""
    if weight is None:
        return x
    return rms_norm(x, weight, eps) if gate is None else gated_rms_norm(x, gate, weight, eps)


def norm_scale(norm_parts: torch.Tensor, k: int, eps: float, shape: torch.Size) -> torch.Tensor:
    """An RMSNorm's per-row scale rsqrt(mean(x^2) + eps) from the sums of squares a producer
    left (:func:`small_batch_linear_prepare_norm`), ``norm_parts`` (blocks of columns, rows)
    summed over the blocks; shaped ``shape[:-1] + (1,)`` to scale outputs of x's leading dims."""
    return torch.rsqrt(norm_parts.sum(0) / k + eps).reshape(*shape[:-1], 1)


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, where ``weight`` may be int8 with a scale per row (``weight_scale`` (N,)): the
    products over the integers, each output column times its scale, then the bias."""
    if weight_scale is None:
        return F.linear(x, weight, bias)
    out = F.linear(x, weight.to(x.dtype)) * weight_scale.to(x.dtype)
    return out if bias is None else out + bias


def _prepared_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     norm_parts: torch.Tensor, norm_eps: float, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of the rows x * g whose norm's scale comes from ``norm_parts``: the scale applied
    to the products, then the bias (the order of the GEMV's folded norm)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    out = scaled_linear(x, weight, None, weight_scale).to(compute) * norm_scale(norm_parts, x.shape[-1], norm_eps,
                                                                                 x.shape)
    return (out if bias is None else out + bias.to(compute)).to(x.dtype)


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                       residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                       norm_parts: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The PyTorch form of ``mambaify.ops.small_batch_linear``: [residual +] F.linear(pre_norm(x)),
    or with ``norm_parts`` of x already times the norm's weight, scaled as the parts say; an int8
    weight with ``weight_scale`` as :func:`scaled_linear`."""
    if norm_parts is not None:
        out = _prepared_linear(x, weight, bias, norm_parts, norm_eps, weight_scale)
    else:
        out = scaled_linear(pre_norm(x, norm_weight, norm_eps, gate), weight, bias, weight_scale)
    return out if residual is None else residual + out


def small_batch_linear_prepare_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    residual: torch.Tensor, next_norm_weight: torch.Tensor,
                                    weight_scale: torch.Tensor | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch form of ``mambaify.ops.small_batch_linear_prepare_norm``: the residual stream
    h = residual + F.linear(x, weight, bias), and what the RMSNorm after it needs, so that the
    GEMV after the norm runs none of it: h times the norm's weight (in h's dtype) and each row's
    sum of squares of h (one block of columns here: shape (1, rows))."""
    h = small_batch_linear(x, weight, bias, residual=residual, weight_scale=weight_scale)
    compute = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(compute)
    scaled = (hf * next_norm_weight.to(compute)).to(h.dtype)
    return h, scaled, hf.pow(2).sum(-1).reshape(1, -1)


def small_batch_gated_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                         norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                         norm_parts: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
                         up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch form of ``mambaify.ops.small_batch_gated_up``: silu(x gate^T) * (x up^T) of
    pre_norm(x), or with ``norm_parts`` of x already times the norm's weight; int8 matrices with
    their scales as :func:`scaled_linear`."""
    if norm_parts is not None:
        return F.silu(_prepared_linear(x, gate, None, norm_parts, norm_eps, gate_scale)) * _prepared_linear(
            x, up, None, norm_parts, norm_eps, up_scale)
    x = pre_norm(x, norm_weight, norm_eps)
    return F.silu(scaled_linear(x, gate, None, gate_scale)) * scaled_linear(x, up, None, up_scale)


def small_batch_qkv(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                    v_bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                    norm_eps: float = 1e-6, norm_parts: torch.Tensor | None = None,
                    weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch form of ``mambaify.ops.small_batch_qkv``: q, k and v of pre_norm(x), side by
    side, or with ``norm_parts`` of x already times the norm's weight; int8 matrices with
    ``weight_scale`` (their scales side by side) as :func:`scaled_linear`."""
    q_end, k_end = q.shape[0], q.shape[0] + k.shape[0]
    scales = (None,) * 3 if weight_scale is None else (weight_scale[:q_end], weight_scale[q_end:k_end],
                                                       weight_scale[k_end:])
    mats = ((q, q_bias, scales[0]), (k, k_bias, scales[1]), (v, v_bias, scales[2]))
    if norm_parts is not None:
        return torch.cat([_prepared_linear(x, w, b, norm_parts, norm_eps, c) for w, b, c in mats], -1)
    x = pre_norm(x, norm_weight, norm_eps)
    return torch.cat([scaled_linear(x, w, b, c) for w, b, c in mats], -1)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time, channels last: y_t = bias + sum_k weight[:, k] * x_{t-(K-1)+k}.

    x (b,t,d), weight (d,K), bias (d), initial_state (b,d,K-1): the K-1 inputs before x (zeros
    if None). seq_pos (b,t), if given, is each token's position inside its document: a tap that
    would reach back past the document's start reads zero (packed rows). Returns the
    pre-activation output (b,t,d) and the new state, the last K-1 inputs (b,d,K-1).
    """
    b, t, d = x.shape
    K = weight.shape[-1]
    if initial_state is None:
        history = x.new_zeros(b, K - 1, d)
    else:
        history = initial_state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([history, x], dim=1)  # (b, t+K-1, d)
    y = x.new_zeros(b, t, d) if bias is None else bias.to(x.dtype).expand(b, t, d).clone()
    for k in range(K):
        lag = K - 1 - k
        tap = xp[:, k : k + t] * weight[:, k].to(x.dtype)
        if seq_pos is not None and lag > 0:
            tap = tap * (seq_pos >= lag)[..., None].to(x.dtype)
        y = y + tap
    new_state = xp[:, -(K - 1) :].transpose(1, 2) if K > 1 else x.new_zeros(b, d, 0)
    return y, new_state.contiguous()


# --- Speculative verification (PAPER.md section 3) -------------------------------------------
# A Mamba layer keeps one checkpointed state plus the inputs (x, dt, B) of the last verify call's
# tokens; a verify call first folds the counts[b] accepted ones into the checkpoint, then runs
# the new tokens from there. The conv keeps a window of raw inputs, slid by the same counts.


def check_verify_shapes(
    checkpoint: torch.Tensor,
    x_cache: torch.Tensor,
    dt_cache: torch.Tensor,
    B_cache: torch.Tensor,
    counts: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[int, int]:
    """Raise a ValueError naming the mismatch unless the shapes fit :func:`ssd_verify`; returns (T, t)."""
    if checkpoint.dim() != 4 or x.dim() != 4 or x_cache.dim() != 4:
        raise ValueError(
            f"ssd_verify expects checkpoint (b,h,n,p), x and x_cache (b,t,h,p); got checkpoint "
            f"{tuple(checkpoint.shape)}, x {tuple(x.shape)}, x_cache {tuple(x_cache.shape)}"
        )
    b, h, n, p = checkpoint.shape
    T, t = x_cache.shape[1], x.shape[1]

    def heads(v: torch.Tensor) -> int:  # x, B and C may come per group of heads (a divisor of h)
        g = v.shape[2] if v.dim() == 4 else h
        return g if 0 < g <= h and h % g == 0 else h

    expected = {
        "x_cache": (x_cache, (b, T, h, p)),
        "dt_cache": (dt_cache, (b, T, h)),
        "B_cache": (B_cache, (b, T, h, n)),
        "counts": (counts, (b,)),
        "x": (x, (b, t, heads(x), p)),
        "dt": (dt, (b, t, h)),
        "B": (B, (b, t, heads(B), n)),
        "C": (C, (b, t, heads(C), n)),
    }
    wrong = [f"{k} {tuple(v.shape)} (expected {s})" for k, (v, s) in expected.items() if tuple(v.shape) != s]
    if wrong:
        raise ValueError(
            f"ssd_verify shapes disagree with checkpoint (b,h,n,p)={tuple(checkpoint.shape)}: " + ", ".join(wrong)
        )
    if t > T:
        raise ValueError(
            f"ssd_verify: {t} new tokens do not fit the input caches of length {T}; allocate the caches "
            f"with T >= the tokens per verify call (K + 1)"
        )
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"ssd_verify: counts must be an integer tensor, got {counts.dtype}")
    return T, t


def check_counts(counts: torch.Tensor, T: int, check: bool | None = None, what: str = "ssd_verify") -> None:
    """Raise a ValueError unless 0 <= counts <= T.

    Reading the values of a CUDA tensor waits for the GPU, and a CUDA graph cannot wait while it
    is captured, so ``check=None`` checks everywhere except during a capture; ``check=False``
    skips the check (the kernels clamp counts to [0, T] anyway, so no memory is touched out of
    bounds, but the results would be wrong), ``check=True`` always checks.
    """
    if check is None:
        check = not (counts.is_cuda and torch.cuda.is_current_stream_capturing())
    if not check or counts.numel() == 0:
        return
    lo, hi = int(counts.min()), int(counts.max())
    if lo < 0 or hi > T:
        raise ValueError(
            f"{what}: counts must lie in [0, {T}] (tokens of the last call to fold in), got values in [{lo}, {hi}]"
        )


def ssd_fold(
    checkpoint: torch.Tensor,
    x_cache: torch.Tensor,
    dt_cache: torch.Tensor,
    B_cache: torch.Tensor,
    counts: torch.Tensor,
    A: torch.Tensor,
) -> torch.Tensor:
    """The checkpoint (b,h,n,p) with the first counts[b] cached tokens of row b folded in.

    x_cache (b,T,h,p), dt_cache (b,T,h), B_cache (b,T,h,n), counts (b,). Tokens past a row's
    count are zeroed (dt = 0: decay exp(0) = 1 and a zero write; x and B too, so that whatever
    stale values those slots hold, even NaN, leave the state bit for bit as it was).
    Returns the new state in the compute dtype.
    """
    keep = torch.arange(x_cache.shape[1], device=x_cache.device)[None, :] < counts[:, None]  # (b, T)
    x_, dt_, B_ = (v.masked_fill(~keep.view(*keep.shape, *[1] * (v.dim() - 2)), 0.0) for v in (x_cache, dt_cache, B_cache))
    _, state = ssd_sequential(x_, dt_, A, B_, torch.zeros_like(B_), initial_state=checkpoint)
    return state


def ssd_verify(
    checkpoint: torch.Tensor,
    x_cache: torch.Tensor,
    dt_cache: torch.Tensor,
    B_cache: torch.Tensor,
    counts: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mamba layer's verify call, out of place: fold, then run the new tokens.

    checkpoint (b,h,n,p); the last call's cached inputs x_cache (b,T,h,p), dt_cache (b,T,h),
    B_cache (b,T,h,n), of which the first counts[b] (b,) were accepted; the new tokens x
    (b,t,h,p), dt (b,t,h) (already softplus-ed), B and C (b,t,h,n); A (h); D (h) or None.
    Returns y (b,t,h,p) in x's dtype and the folded checkpoint (b,h,n,p) in the compute dtype:
    the state after the accepted tokens, *not* after the new ones (their states are transients;
    the caller caches x, dt, B to fold the accepted ones in next time).
    """
    T, _ = check_verify_shapes(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, B, C)
    check_counts(counts, T)
    folded = ssd_fold(checkpoint, x_cache, dt_cache, B_cache, counts, A)
    y, _ = ssd_sequential(x, dt, A, B, C, D, initial_state=folded)
    return y, folded


def slide_conv_window(window: torch.Tensor, counts: torch.Tensor, d_conv: int) -> torch.Tensor:
    """The d_conv - 1 raw conv inputs before the next token, (b, d_conv-1, c): rows
    counts[b] .. counts[b] + d_conv - 2 of window (b, d_conv-1+T, c)."""
    offsets = counts[:, None].long() + torch.arange(d_conv - 1, device=window.device)[None, :]
    return window.gather(1, offsets[..., None].expand(-1, -1, window.shape[-1]))


def conv_verify(
    window: torch.Tensor,
    counts: torch.Tensor,
    xBC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv side of a verify call, out of place.

    window (b, d_conv-1+T, c): the d_conv - 1 raw inputs before the last call, then that call's
    T slots; counts (b,) of them were accepted. xBC (b,t,c) the new raw inputs, weight (c, d_conv),
    bias (c) or None. Returns the pre-activation conv output (b,t,c) of xBC over the slid
    history, and that history (b, d_conv-1, c); the new window is [history, xBC, rest].
    """
    d_conv = weight.shape[-1]
    T = window.shape[1] - (d_conv - 1)
    if window.dim() != 3 or xBC.dim() != 3 or window.shape[0] != xBC.shape[0] or window.shape[2] != xBC.shape[2]:
        raise ValueError(f"conv_verify: window {tuple(window.shape)} and xBC {tuple(xBC.shape)} must be (b, ., c) alike")
    if xBC.shape[1] > T:
        raise ValueError(
            f"conv_verify: {xBC.shape[1]} new tokens do not fit a window of d_conv-1+{T} rows; "
            f"allocate it with d_conv - 1 + (tokens per verify call) rows"
        )
    check_counts(counts, T, what="conv_verify")
    history = slide_conv_window(window, counts, d_conv)
    y, _ = causal_conv1d(xBC, weight, bias, history.transpose(1, 2))
    return y, history
