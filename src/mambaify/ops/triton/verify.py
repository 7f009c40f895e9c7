"""Fused kernels for a Mamba layer's speculative verify call (PAPER.md section 3).

The layer keeps ONE checkpointed SSM state, at the last token folded in, plus the inputs
(x, dt, B) of the last call's tokens. One launch of :func:`ssd_verify_inplace` per layer and call:

1. loads the checkpoint, replays the counts[b] accepted cached tokens into it, writes it back;
2. runs the t new tokens from there, emitting y, with every per-token state a transient in
   registers, never stored;
3. stores the new tokens' x, dt, B into the caches, for the next call to replay.

:func:`ssd_verify_store_states` is the naive alternative the benchmark compares against: every
per-token state goes to memory and the next call starts from the accepted one by a gather.
:func:`conv_verify_inplace` is the conv side: a window of d_conv - 1 + T raw inputs, slid by
counts[b], then extended by the new tokens.

Ownership, which the in-place updates rely on: a program owns one (batch, head, block of p
columns) of the state and of x; every program of a (batch, head) reads all of that head's cached
dt and B. So dt and B may only be overwritten once every p-block of the head has replayed: each
program takes a ticket (an atomic counter per (batch, head)) after its replay, and the last one
writes dt and B and resets the counter. No program waits for another, so any launch order works.
Notation as in :mod:`mambaify.ops.reference`; all tensors are passed with their strides, so
inputs may be strided views (e.g. B expanded from the kv heads with stride 0). The caches must
be ordinary writable tensors (no two elements sharing memory).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import check_counts, check_verify_shapes
from .decode import _acc_dtype, _block_p, _num_sms, softplus_in_dtype
from .pdl import launch_options, wait_for_inputs

# --------------------------------------------------------------------------- SSD verify


@triton.jit
def _row(tile, offs_t, i):
    """Row i of a (BLOCK_T, BLOCK) tile in registers, as a (BLOCK,) vector."""
    return tl.sum(tl.where((offs_t == i)[:, None], tile, 0.0), axis=0)


@triton.jit
def _entry(vector, offs_t, i):
    """Entry i of a (BLOCK_T,) vector in registers."""
    return tl.sum(tl.where(offs_t == i, vector, 0.0), axis=0)


@triton.jit
def _ssd_verify_kernel(
    ckpt_ptr, xc_ptr, dtc_ptr, Bc_ptr, counts_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    states_ptr, tickets_ptr, dt_bias_ptr,
    T, t, H, N, P, X_REP, B_REP, C_REP,
    s_sb, s_sh, s_sn, s_sp,
    xc_sb, xc_st, xc_sh, xc_sp,
    dtc_sb, dtc_st, dtc_sh,
    Bc_sb, Bc_st, Bc_sh, Bc_sn,
    cnt_sb,
    x_sb, x_st, x_sh, x_sp,
    dt_sb, dt_st, dt_sh,
    B_sb, B_st, B_sh, B_sn,
    C_sb, C_st, C_sh, C_sn,
    y_sb, y_st, y_sh, y_sp,
    st_sb, st_st, st_sh, st_sn, st_sp,
    HAS_D: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    SHARED_BH: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (batch b, head h, block of p columns). With c = clamp(counts[b], 0, T):

    fused (STORE_STATES=False):
        S = checkpoint[b,h]; for i < c: S = exp(dtc_i A) S + Bc_i (dtc_i xc_i)^T   (cached inputs)
        checkpoint[b,h] = S                                                      (if c > 0)
        for i < t: S = exp(dt_i A) S + B_i (dt_i x_i)^T;  y_i = S^T C_i + D x_i  (S not stored)
        caches[b, i, h] = x_i, dt_i, B_i for i < t
    naive (STORE_STATES=True), with states (b,T,h,n,p) the last call's per-token states:
        S = states[b, c-1, h] if c > 0 else checkpoint[b,h];  checkpoint[b,h] = S   (if c > 0)
        for i < t: as above, and states[b, i, h] = S

    Both loops are sequential in S, but their inputs are not. PREFETCH: every token's inputs
    (BLOCK_T >= T >= t rows) are loaded in one go before the loops, which take each token's row
    from registers; else each step loads its token's inputs, a global-memory latency on every
    step of the chain (session 3: 7.5 us for K = 3 on the 8B shape, against 3.3 us for one
    decode step). The launcher prefetches where the tiles fit one warp (:func:`_prefetch_pays`,
    measured in session 11); MAMBAIFY_VERIFY_PREFETCH=0 keeps the per-step loads everywhere, and
    bench_kernels.py --only verify times both.
    As in the decode step (:func:`~mambaify.ops.triton.decode._ssd_step_kernel`), the new x, B
    and C may come per group of heads (X_REP, B_REP, C_REP heads to a group) and, with
    DT_SOFTPLUS, dt raw (softplus(dt + dt_bias[h]) here, in dt's dtype, and cached as such).
    """
    wait_for_inputs(PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hx, hb, hc = h // X_REP, h // B_REP, h // C_REP  # the heads' groups in x, B and C
    acc = ckpt_ptr.dtype.element_ty
    dt_bias = 0.0
    if DT_SOFTPLUS:
        dt_bias = tl.load(dt_bias_ptr + h)

    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P
    mask = mask_n[:, None] & mask_p[None, :]
    a = tl.load(A_ptr + h).to(acc)
    if HAS_D:  # read here, with the rest: a load issued after the checkpoint's store would wait on its own
        D = tl.load(D_ptr + h).to(acc)
    else:
        D = 0.0
    count = tl.load(counts_ptr + b * cnt_sb).to(tl.int32)
    count = tl.minimum(tl.maximum(count, 0), T)  # out-of-range counts must not reach memory
    # Conditions on the scalar count as (n, 1) vectors: Triton's interpreter mistypes a scalar
    # bool combined with a vector mask.
    folds = ((offs_n * 0 + count) > 0)[:, None]

    # The new tokens' inputs, rows t.. as zeros.
    new = offs_t < t
    new_p = new[:, None] & mask_p[None, :]
    new_n = new[:, None] & mask_n[None, :]
    dt_raw = tl.load(dt_ptr + b * dt_sb + offs_t * dt_st + h * dt_sh, mask=new, other=0.0)
    if DT_SOFTPLUS:
        dt_raw = softplus_in_dtype(dt_raw, dt_bias, acc)
    x_raw = tl.load(x_ptr + b * x_sb + offs_t[:, None] * x_st + hx * x_sh + offs_p[None, :] * x_sp, mask=new_p, other=0.0)
    B_raw = tl.load(B_ptr + b * B_sb + offs_t[:, None] * B_st + hb * B_sh + offs_n[None, :] * B_sn, mask=new_n, other=0.0)
    C_new = tl.load(C_ptr + b * C_sb + offs_t[:, None] * C_st + hc * C_sh + offs_n[None, :] * C_sn, mask=new_n,
                    other=0.0).to(acc)
    dt_new, x_new, B_new = dt_raw.to(acc), x_raw.to(acc), B_raw.to(acc)

    ckpt_ptrs = ckpt_ptr + b * s_sb + h * s_sh + offs_n[:, None] * s_sn + offs_p[None, :] * s_sp
    if STORE_STATES:
        # The accepted state is stored already: gather it (or keep the checkpoint if none was accepted).
        prev = tl.maximum(count - 1, 0)
        from_states = states_ptr + b * st_sb + prev * st_st + h * st_sh
        S = tl.load(from_states + offs_n[:, None] * st_sn + offs_p[None, :] * st_sp, mask=mask & folds, other=0.0)
        S += tl.load(ckpt_ptrs, mask=mask & ~folds, other=0.0)
        S = S.to(acc)
    else:
        S = tl.load(ckpt_ptrs, mask=mask, other=0.0)
        # Rows count.. as zeros (loaded, unused, without PREFETCH: the compiler drops them).
        replayed = offs_t < count
        dt_old = tl.load(dtc_ptr + b * dtc_sb + offs_t * dtc_st + h * dtc_sh, mask=replayed, other=0.0).to(acc)
        x_old = tl.load(xc_ptr + b * xc_sb + offs_t[:, None] * xc_st + h * xc_sh + offs_p[None, :] * xc_sp,
                        mask=replayed[:, None] & mask_p[None, :], other=0.0).to(acc)
        B_old = tl.load(Bc_ptr + b * Bc_sb + offs_t[:, None] * Bc_st + h * Bc_sh + offs_n[None, :] * Bc_sn,
                        mask=replayed[:, None] & mask_n[None, :], other=0.0).to(acc)
        for i in range(0, count):
            if PREFETCH:
                dti, xi, Bi = _entry(dt_old, offs_t, i), _row(x_old, offs_t, i), _row(B_old, offs_t, i)
            else:
                dti = tl.load(dtc_ptr + b * dtc_sb + i * dtc_st + h * dtc_sh).to(acc)
                xi = tl.load(xc_ptr + b * xc_sb + i * xc_st + h * xc_sh + offs_p * xc_sp, mask=mask_p, other=0.0).to(acc)
                Bi = tl.load(Bc_ptr + b * Bc_sb + i * Bc_st + h * Bc_sh + offs_n * Bc_sn, mask=mask_n, other=0.0).to(acc)
            S = tl.exp(dti * a) * S + Bi[:, None] * (dti * xi)[None, :]
    # Every load of what this program overwrites below (the checkpoint, the cached x of its
    # p-block, the stored states) is issued before any thread stores.
    tl.debug_barrier()
    tl.store(ckpt_ptrs, S, mask=mask & folds)

    # The last p-block program of this (b, h) to get here writes the shared dt and B caches.
    owns_shared = offs_t == offs_t  # every p-block is the only one when p is not split
    if not STORE_STATES:
        if SHARED_BH:
            ticket = tl.atomic_add(tickets_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            is_last = ticket == tl.num_programs(1) - 1
            tl.store(tickets_ptr + pid_bh, 0, mask=is_last)  # ready for the next call
            owns_shared = (offs_t * 0 + ticket) == tl.num_programs(1) - 1

    for i in range(0, t):
        if PREFETCH:
            dti, xi = _entry(dt_new, offs_t, i), _row(x_new, offs_t, i)
            Bi, Ci = _row(B_new, offs_t, i), _row(C_new, offs_t, i)
        else:
            dti = tl.load(dt_ptr + b * dt_sb + i * dt_st + h * dt_sh)
            if DT_SOFTPLUS:
                dti = softplus_in_dtype(dti, dt_bias, acc)
            dti = dti.to(acc)
            xi = tl.load(x_ptr + b * x_sb + i * x_st + hx * x_sh + offs_p * x_sp, mask=mask_p, other=0.0).to(acc)
            Bi = tl.load(B_ptr + b * B_sb + i * B_st + hb * B_sh + offs_n * B_sn, mask=mask_n, other=0.0).to(acc)
            Ci = tl.load(C_ptr + b * C_sb + i * C_st + hc * C_sh + offs_n * C_sn, mask=mask_n, other=0.0).to(acc)
        S = tl.exp(dti * a) * S + Bi[:, None] * (dti * xi)[None, :]
        y = tl.sum(S * Ci[:, None], axis=0) + D * xi
        tl.store(y_ptr + b * y_sb + i * y_st + h * y_sh + offs_p * y_sp, y.to(y_ptr.dtype.element_ty), mask=mask_p)
        if STORE_STATES:
            to_states = states_ptr + b * st_sb + i * st_st + h * st_sh
            tl.store(to_states + offs_n[:, None] * st_sn + offs_p[None, :] * st_sp, S, mask=mask)
    if not STORE_STATES:
        # The new tokens' inputs, for the next call to replay: at positions 0..t-1 of the caches.
        tl.store(xc_ptr + b * xc_sb + offs_t[:, None] * xc_st + h * xc_sh + offs_p[None, :] * xc_sp,
                 x_raw.to(xc_ptr.dtype.element_ty), mask=new_p)
        tl.store(Bc_ptr + b * Bc_sb + offs_t[:, None] * Bc_st + h * Bc_sh + offs_n[None, :] * Bc_sn,
                 B_raw.to(Bc_ptr.dtype.element_ty), mask=new_n & owns_shared[:, None])
        tl.store(dtc_ptr + b * dtc_sb + offs_t * dtc_st + h * dtc_sh, dt_raw.to(dtc_ptr.dtype.element_ty),
                 mask=new & owns_shared)


# Ticket counters, one int32 per (batch, head), per device. A buffer is never freed once handed
# out: a captured CUDA graph keeps pointing at the one it was captured with.
_TICKETS: dict[torch.device, list[torch.Tensor]] = {}


def _tickets(device: torch.device, size: int) -> torch.Tensor:
    held = _TICKETS.setdefault(device, [])
    if held and held[-1].numel() >= size:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "ssd_verify_inplace needs a counter buffer for batch * heads = "
            f"{size} that does not exist yet, and cannot allocate it while a CUDA graph is "
            "captured; run the call once (a warm-up) before capturing"
        )
    buffer = torch.zeros(max(size, 256), dtype=torch.int32, device=device)
    held.append(buffer)
    return buffer


def prefetch_default() -> bool:
    """Whether the verify kernel loads every token's inputs before its loops (see
    _ssd_verify_kernel), unless MAMBAIFY_VERIFY_PREFETCH=0."""
    return os.environ.get("MAMBAIFY_VERIFY_PREFETCH", "1") != "0"


def _tile_values(block_t: int, block_n: int, block_p: int) -> int:
    """float32 values a program holds prefetched: its state tile and every token's input tiles."""
    return block_n * block_p + block_t * (3 * block_n + 2 * block_p)


def _num_warps(block_t: int, block_n: int, block_p: int, prefetch: bool) -> int:
    """Prefetched, the fewest warps that hold the state tile and the input tiles in about 96
    float32 registers a thread: with one warp, taking a token's row from a tile is warp
    shuffles, with more a shared-memory round trip and barriers at every step. Else Triton's 4."""
    if not prefetch:
        return 4
    return next((w for w in (1, 2, 4) if _tile_values(block_t, block_n, block_p) <= 96 * 32 * w), 8)


def _prefetch_pays(block_t: int, block_n: int, block_p: int) -> bool:
    """Where the prefetched tiles fit one warp. Measured on the H200 (session 11, K = 3): one warp,
    prefetched, beat per-step loads at batch 1 (8B shape 6.9 against 8.3 us, SmolLM2's 4.1
    against 5.7 us); at the 8B shape's batch 8 (64 columns a program, four warps) it lost, 33.8
    against 21.7 us."""
    return _tile_values(block_t, block_n, block_p) <= 96 * 32


def _launch(
    checkpoint, x_cache, dt_cache, B_cache, states, counts, x, dt, A, B, C, D, out, block_p, store_states,
    prefetch=None, dt_bias=None,
):
    b, h, n, p = checkpoint.shape
    reps = (h // x.shape[2], h // B.shape[2], h // C.shape[2])  # heads per group (shapes checked by the callers)
    T, t = (states if store_states else x_cache).shape[1], x.shape[1]
    block_p = block_p or _block_p(b * h, p, checkpoint.device)
    block_t, block_n = triton.next_power_of_2(max(T, t)), triton.next_power_of_2(n)
    if prefetch is None:
        prefetch = prefetch_default() and _prefetch_pays(block_t, block_n, block_p)
    p_blocks = triton.cdiv(p, block_p)
    shared = p_blocks > 1 and not store_states
    tickets = _tickets(checkpoint.device, b * h) if shared else counts
    # Unused pointers get a real tensor of the right kind; the constexpr flags keep them unread.
    caches = (x_cache, dt_cache, B_cache) if not store_states else (x, dt, B)
    cache_strides = (
        (*x_cache.stride(), *dt_cache.stride(), *B_cache.stride())
        if not store_states
        else (0,) * 11
    )
    states_arg = states if store_states else checkpoint
    states_strides = states.stride() if store_states else (0,) * 5
    _ssd_verify_kernel[(b * h, p_blocks)](
        checkpoint, *caches, counts,
        x, dt, A, B, C, D if D is not None else A, out,
        states_arg, tickets, dt_bias if dt_bias is not None else A,
        T, t, h, n, p, *reps,
        *checkpoint.stride(),
        *cache_strides,
        counts.stride(0),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *out.stride(),
        *states_strides,
        HAS_D=D is not None,
        DT_SOFTPLUS=dt_bias is not None,
        STORE_STATES=store_states,
        SHARED_BH=shared,
        PREFETCH=prefetch,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        BLOCK_P=block_p,
        num_warps=_num_warps(block_t, block_n, block_p, prefetch),
        **launch_options(checkpoint.device),
    )
    return out


def ssd_verify_inplace(
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
    out: torch.Tensor | None = None,
    *,
    check_counts_values: bool | None = None,
    block_p: int | None = None,
    prefetch: bool | None = None,
    dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`mambaify.ops.reference.ssd_verify` in one launch, in place.

    checkpoint (b,h,n,p) float32 (or float64) is folded in place; x_cache (b,T,h,p), dt_cache
    (b,T,h), B_cache (b,T,h,n) are read (first counts[b] tokens) and then overwritten with the
    new x, dt, B at positions 0..t-1 (T >= t). counts (b,) integer. x (b,t,h,p), dt (b,t,h),
    B, C (b,t,h,n), A (h), D (h) or None. y (b,t,h,p) goes to ``out`` (allocated in x's dtype
    if None; nothing is allocated when it is given, so the call can be captured in a CUDA graph
    after one warm-up call). ``check_counts_values``: see :func:`reference.check_counts`.
    ``block_p`` overrides the p columns per program (tests use it to split heads); ``prefetch``
    the kernel's loads (see :func:`_ssd_verify_kernel`; None: :func:`prefetch_default` where
    :func:`_prefetch_pays`). x, B and C may hold groups of heads, and ``dt_bias`` makes dt the
    raw projection (see :func:`mambaify.ops.ssd_verify_inplace`).
    """
    T, t = check_verify_shapes(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, B, C)
    check_counts(counts, T, check_counts_values)
    if out is None:
        out = x.new_empty(x.shape[0], t, checkpoint.shape[1], x.shape[3])
    return _launch(checkpoint, x_cache, dt_cache, B_cache, None, counts, x, dt, A, B, C, D, out, block_p, False,
                   prefetch, dt_bias)


def ssd_verify_store_states(
    checkpoint: torch.Tensor,
    states: torch.Tensor,
    counts: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    check_counts_values: bool | None = None,
    block_p: int | None = None,
    prefetch: bool | None = None,
) -> torch.Tensor:
    """The naive verify call, for comparison: every per-token state is written to memory.

    states (b,T,h,n,p), in the checkpoint's dtype, holds the last call's per-token states; the
    call starts from states[b, counts[b]-1] (a gather; the checkpoint when counts[b] = 0), saves
    that start into ``checkpoint`` (b,h,n,p), runs x (b,t,h,p), dt (b,t,h), B, C (b,t,h,n) and
    writes the state after each new token into states[:, :t]. Same y and checkpoint as
    :func:`ssd_verify_inplace` given the same history.
    """
    b, h, n, p = checkpoint.shape
    if states.dim() != 5 or states.shape[0] != b or tuple(states.shape[2:]) != (h, n, p):
        raise ValueError(
            f"ssd_verify_store_states: states {tuple(states.shape)} must be (b,T,h,n,p) for "
            f"checkpoint {tuple(checkpoint.shape)}"
        )
    T, t = states.shape[1], x.shape[1]
    expected = {
        "counts": (counts, (b,)), "x": (x, (b, t, h, p)), "dt": (dt, (b, t, h)), "B": (B, (b, t, h, n)), "C": (C, (b, t, h, n)),
    }
    wrong = [f"{k} {tuple(v.shape)} (expected {s})" for k, (v, s) in expected.items() if tuple(v.shape) != s]
    if t > T:
        wrong.append(f"{t} new tokens but states hold {T}")
    if wrong:
        raise ValueError(f"ssd_verify_store_states: shapes disagree with states {tuple(states.shape)}: " + ", ".join(wrong))
    check_counts(counts, T, check_counts_values, what="ssd_verify_store_states")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(checkpoint, None, None, None, states, counts, x, dt, A, B, C, D, out, block_p, True, prefetch)


# --------------------------------------------------------------------------- conv verify


@triton.jit
def _conv_verify_kernel(
    win_ptr, counts_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    T, t, DIM,
    win_sb, win_sl, win_sc,
    cnt_sb,
    x_sb, x_st, x_sc,
    w_sc, w_sk,
    y_sb, y_st, y_sc,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (batch b, block of channels). With c = clamp(counts[b], 0, T), the history
    hist = window[b, c : c+K-1] and the sequence s = [hist, x[b]] (K-1+t rows):

        y[b, i] = bias + sum_k weight[:, k] * s[i + k]          (silu optional)
        window[b, :K-1+t] = s                                    (in place; later rows untouched)
    """
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < DIM
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < t
    count = tl.load(counts_ptr + b * cnt_sb).to(tl.int32)
    count = tl.minimum(tl.maximum(count, 0), T)
    row = win_ptr + b * win_sb + offs_c[None, :] * win_sc
    x_row = x_ptr + b * x_sb + offs_c[None, :] * x_sc
    # What the window's update writes, read with the taps' inputs, before any store: a load
    # issued after the store of y would wait on global memory a second time.
    tile = mask_t[:, None] & mask_c[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    hist_tile = (offs_h < K - 1)[:, None] & mask_c[None, :]
    history = tl.load(row + (count + offs_h)[:, None] * win_sl, mask=hist_tile, other=0.0)
    new = tl.load(x_row + offs_t[:, None] * x_st, mask=tile, other=0.0)

    y = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for k in tl.static_range(K):
        # Tap k of output i reads s[i + k]: the history while i + k < K - 1, else x[i + k - (K-1)].
        j = offs_t + k
        in_hist = (j < K - 1) & mask_t
        in_x = (j >= K - 1) & mask_t
        from_hist = tl.load(row + (count + j)[:, None] * win_sl, mask=in_hist[:, None] & mask_c[None, :], other=0.0)
        from_x = tl.load(x_row + (j - (K - 1))[:, None] * x_st, mask=in_x[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(w_ptr + offs_c * w_sc + k * w_sk, mask=mask_c, other=0.0).to(ACC)
        y += (from_hist.to(ACC) + from_x.to(ACC)) * w[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * y_sb + offs_t[:, None] * y_st + offs_c[None, :] * y_sc, y.to(y_ptr.dtype.element_ty), mask=tile)
    # The history may lie where it is about to be written (rows overlap when count < K - 1):
    # every program's loads first, then the stores.
    tl.debug_barrier()
    tl.store(row + offs_h[:, None] * win_sl, history, mask=hist_tile)
    tl.store(row + (K - 1 + offs_t)[:, None] * win_sl, new.to(win_ptr.dtype.element_ty), mask=tile)


def _block_c(b: int, c: int, device: torch.device) -> int:
    # As _block_p: enough programs to cover the SMs at small batch, blocks no smaller than 32.
    block = min(triton.next_power_of_2(c), 256)
    while block > 32 and b * triton.cdiv(c, block) < 2 * _num_sms(device):
        block //= 2
    return block


def conv_verify_inplace(
    window: torch.Tensor,
    counts: torch.Tensor,
    xBC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    silu: bool = False,
    check_counts_values: bool | None = None,
) -> torch.Tensor:
    """:func:`mambaify.ops.reference.conv_verify` in one launch, updating ``window`` in place.

    window (b, d_conv-1+T, c), counts (b,) integer in [0, T], xBC (b,t,c) with t <= T, weight
    (c, d_conv), bias (c) or None. Returns the pre-activation conv output (b,t,c) (SiLU-ed if
    ``silu``) in ``out`` (allocated in xBC's dtype if None).
    """
    _check_conv_shapes(window, counts, xBC, weight, bias)
    b, t, c = xBC.shape
    K = weight.shape[-1]
    T = window.shape[1] - (K - 1)
    check_counts(counts, T, check_counts_values, what="conv_verify_inplace")
    if out is None:
        out = torch.empty(xBC.shape, dtype=xBC.dtype, device=xBC.device)
    block_c = _block_c(b, c, window.device)
    _conv_verify_kernel[(b, triton.cdiv(c, block_c))](
        window, counts, xBC, weight, bias if bias is not None else weight, out,
        T, t, c,
        *window.stride(),
        counts.stride(0),
        *xBC.stride(),
        *weight.stride(),
        *out.stride(),
        K=K,
        BLOCK_T=max(triton.next_power_of_2(t), 1),
        BLOCK_H=max(triton.next_power_of_2(K - 1), 1),
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        APPLY_SILU=silu,
        ACC=_acc_dtype(xBC),
        **launch_options(xBC.device),
    )
    return out


def _check_conv_shapes(window, counts, xBC, weight, bias) -> None:
    if xBC.dim() != 3 or weight.dim() != 2 or window.dim() != 3:
        raise ValueError(
            f"conv_verify expects window (b, d_conv-1+T, c), xBC (b,t,c), weight (c, d_conv); got "
            f"{tuple(window.shape)}, {tuple(xBC.shape)}, {tuple(weight.shape)}"
        )
    b, t, c = xBC.shape
    K = weight.shape[-1]
    T = window.shape[1] - (K - 1)
    problems = []
    if weight.shape[0] != c or window.shape[0] != b or window.shape[2] != c:
        problems.append(f"window {tuple(window.shape)} / weight {tuple(weight.shape)} do not match xBC {tuple(xBC.shape)}")
    if counts.shape != (b,):
        problems.append(f"counts {tuple(counts.shape)} must be ({b},)")
    if bias is not None and bias.shape != (c,):
        problems.append(f"bias {tuple(bias.shape)} must be ({c},)")
    if t > T:
        problems.append(f"{t} new tokens do not fit a window of d_conv-1+{T} rows (allocate d_conv-1+K+1)")
    if problems:
        raise ValueError("conv_verify: " + "; ".join(problems))
