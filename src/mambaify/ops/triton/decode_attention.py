"""Flash-decoding: attention of a few new tokens over a static key/value cache, split over the keys.

With one query token, attention has too little work per (batch, kv head) to fill a GPU: at
batch 1 an 8B-shaped layer has 8 kv heads for 132 SMs. So the key sequence is split too:

1. ``_attention_partial_kernel``: one program per (batch row, kv head, split of the keys, block
   of query rows). Its query tile holds every query head of the kv head's group and every new
   token (rows r = head_in_group * t + token), so each key/value block is read once per group.
   It runs an online softmax over its keys and writes the split's normalised output and
   log-sum-exp (base 2), or, with one split, the final output.
2. ``_attention_combine_kernel``: per query row, weights the splits' outputs by
   exp2(lse_split - lse_total) and writes the result.

Which keys a query sees is read from device memory inside the kernel (kv_start, query_slots), and
so is the key range a program walks: the union of its rows' visible intervals, cut into equal
parts, one per split. Blocks before kv_start or past the last query's slot are never read, and
no host value depends on the slots, so a CUDA graph captured once stays valid as they advance.
Scratch buffers come from a cache keyed by shape and device: after one warm-up call per shape,
a call allocates nothing (when ``out`` is given) and can be captured in a CUDA graph. Calls that
share a workspace must run in stream order (one stream), as a model's layers do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..attention import check_attention_inputs, check_slot_values
from .decode import _num_sms
from .pdl import launch_options, wait_for_inputs

# Splits per (row, kv head, query block) at most, and the fewest keys a split is planned for:
# below that the combine step and the per-program setup cost more than the split saves.
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 128
MAX_HEAD_DIM = 256


@triton.jit
def _attention_partial_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, slots_ptr, out_ptr, o_part_ptr, lse_part_ptr, visited_ptr,
    S, T, GROUP, KV_HEADS, D, SPLITS, window, scale_log2e,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_ss, k_sd,
    v_sb, v_sh, v_ss, v_sd,
    start_sb, slots_sb, slots_st,
    o_sb, o_sh, o_st, o_sd,
    HAS_WINDOW: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    COUNT_BLOCKS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b * KV_HEADS + kv head, split, query block). Query row r of the group is head
    kv_head * GROUP + r // T, token r % T, at slot q = query_slots[b, r % T]; it sees the key
    slots [lo, q] with lo = max(kv_start[b], q - window + 1), or only q when q < kv_start[b]."""
    wait_for_inputs(PDL)
    pid_bk = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bk // KV_HEADS
    kv_head = pid_bk % KV_HEADS
    n_rows = GROUP * T

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    head = kv_head * GROUP + rows // T
    token = rows % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(
        q_ptr + b * q_sb + head[:, None] * q_sh + token[:, None] * q_st + offs_d[None, :] * q_sd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # Each row's visible interval [lo, hi]. Clamped into [0, S - 1] so that bad slots cannot
    # reach memory outside the buffers (the host checks them outside graph capture).
    start = tl.load(start_ptr + b * start_sb).to(tl.int32)
    q_slot = tl.load(slots_ptr + b * slots_sb + token * slots_st, mask=row_ok, other=0).to(tl.int32)
    hi = tl.minimum(tl.maximum(q_slot, 0), S - 1)
    lo = tl.maximum(hi * 0 + start, 0)
    if HAS_WINDOW:
        lo = tl.maximum(lo, hi - window + 1)
    lo = tl.minimum(lo, hi)  # a query on a padding slot sees itself only
    lo = tl.where(row_ok, lo, S)
    hi = tl.where(row_ok, hi, -1)

    # This split's share of the keys any row of the block sees, in whole key blocks.
    first = tl.min(lo, axis=0)
    last = tl.max(hi, axis=0)
    per_split = tl.cdiv(tl.cdiv(last - first + 1, SPLITS), BLOCK_N) * BLOCK_N
    begin = first + split * per_split
    end = tl.minimum(begin + per_split, last + 1)

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    k_base = k_ptr + b * k_sb + kv_head * k_sh
    v_base = v_ptr + b * v_sb + kv_head * v_sh
    for n0 in range(begin, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        # Slots no row sees are not loaded: whatever they hold (stale keys, NaN) stays out.
        needed = tl.max(visible.to(tl.int32), axis=0) > 0
        kv_mask = needed[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * k_ss + offs_d[None, :] * k_sd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale_log2e
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf; exponents must not become -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * v_ss + offs_d[None, :] * v_sd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=ACC
        )
        m = m_new
    if COUNT_BLOCKS:
        visited = tl.cdiv(tl.maximum(end - begin, 0), BLOCK_N)
        tl.store(visited_ptr + (pid_bk * SPLITS + split) * tl.num_programs(2) + pid_m, visited)

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    if SINGLE_SPLIT:
        out_ptrs = out_ptr + b * o_sb + head[:, None] * o_sh + token[:, None] * o_st + offs_d[None, :] * o_sd
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # An empty split (or a row that sees none of its keys) gets lse = -inf: weight 0 below.
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        part = (pid_bk * SPLITS + split) * n_rows + rows
        tl.store(lse_part_ptr + part, lse, mask=row_ok)
        tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr,
    T, GROUP, KV_HEADS, D, SPLITS,
    o_sb, o_sh, o_st, o_sd,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b * KV_HEADS + kv head, query row r): out = sum_j w_j o_j / sum_j w_j with
    w_j = exp2(lse_j - max_j lse_j) over the splits j."""
    wait_for_inputs(PDL)
    pid_bk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    b = pid_bk // KV_HEADS
    head = (pid_bk % KV_HEADS) * GROUP + row // T
    token = row % T
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    part = (pid_bk * SPLITS + splits) * (GROUP * T) + row
    lse = tl.load(lse_part_ptr + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    o = tl.load(o_part_ptr + part[:, None] * D + offs_d[None, :], mask=split_ok[:, None] & d_ok[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    out_ptrs = out_ptr + b * o_sb + head * o_sh + token * o_st + offs_d * o_sd
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------- launch


def _acc_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    # float64 only in the CPU interpreter tests, where it lets the kernel match the reference tightly.
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def block_sizes(rows: int, head_dim: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for ``rows`` = group * t query rows of one kv head and
    elements of ``itemsize`` bytes. tl.dot needs every side >= 16; a group's rows (decode and
    verify) fit one block. A key block of K and V is 32 KB at most (64 keys of 128 bf16), so
    three pipeline stages fit in shared memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(max(16, triton.next_power_of_2(rows)), 128 if block_d <= 128 else 64)
    block_n = max(16, min(64, 16384 // (block_d * itemsize)))
    return block_m, block_n, block_d


def choose_num_splits(batch: int, kv_heads: int, query_blocks: int, slots: int, device: torch.device) -> int:
    """Splits of the key sequence: enough programs for about two per SM, but no split planned
    with fewer than MIN_KEYS_PER_SPLIT of the ``slots`` keys, and at most MAX_SPLITS."""
    programs = batch * kv_heads * query_blocks
    wanted = triton.cdiv(2 * _num_sms(device), programs)
    return max(1, min(wanted, triton.cdiv(slots, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


class LaunchPlan(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    query_blocks: int  # programs along the group's query rows
    splits: int  # programs along the keys


def plan_launch(
    batch: int,
    heads: int,
    kv_heads: int,
    tokens: int,
    slots: int,
    head_dim: int,
    device: torch.device,
    num_splits: int | None = None,
    block_n: int | None = None,
    itemsize: int = 2,
) -> LaunchPlan:
    """Tile sizes and grid of :func:`decode_attention` for these shapes (``num_splits`` and
    ``block_n`` override the automatic choices)."""
    rows = heads // kv_heads * tokens
    block_m, default_n, block_d = block_sizes(rows, head_dim, itemsize)
    if block_n is None:
        block_n = default_n
    elif block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"decode_attention (Triton): block_n must be a power of two >= 16, got {block_n}")
    query_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, query_blocks, slots, device)
    elif num_splits < 1:
        raise ValueError(f"decode_attention (Triton): num_splits must be >= 1, got {num_splits}")
    return LaunchPlan(block_m, block_n, block_d, query_blocks, num_splits)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(programs: int, splits: int, rows: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    """(partial outputs (programs, splits, rows, d), their lse (programs, splits, rows)), made
    once per shape and device and reused: a CUDA graph captures the same buffers every call."""
    key = (device, dtype, programs, splits, rows, head_dim)
    bufs = _WORKSPACES.get(key)
    if bufs is None:
        bufs = (
            torch.empty(programs, splits, rows, head_dim, dtype=dtype, device=device),
            torch.empty(programs, splits, rows, dtype=dtype, device=device),
        )
        _WORKSPACES[key] = bufs
    return bufs


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_start: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    check_values: bool | None = None,
    visited_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`mambaify.ops.attention.decode_attention` on the Triton kernels (same arguments).

    ``num_splits`` overrides :func:`choose_num_splits` and ``block_n`` the key block (a power of
    two >= 16), for tests and tuning. If ``visited_blocks`` (a contiguous int32 tensor of
    b * kv_heads * splits * query_blocks elements) is given, each program writes into it how many
    key blocks it read, so tests can see which blocks are skipped. Returns ``out`` (b, h, t, d),
    allocated if None.
    """
    kv_start, query_slots = check_attention_inputs(
        query, keys, values, kv_start, query_slots, scale, sliding_window, out, what="decode_attention (Triton)"
    )
    b, h, t, d = query.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(
            f"decode_attention (Triton): head_dim {d} > {MAX_HEAD_DIM} is not supported; "
            "use mambaify.ops.attention.decode_attention_reference"
        )
    check_slot_values(kv_start, query_slots, S, check_values, what="decode_attention (Triton)")
    if out is None:
        out = torch.empty_like(query)
    plan = plan_launch(b, h, kv_heads, t, S, d, query.device, num_splits, block_n, query.element_size())
    group, rows, splits = h // kv_heads, h // kv_heads * t, plan.splits
    acc_torch, acc_tl = _acc_dtypes(query.dtype)
    single = splits == 1
    o_part, lse_part = (out, out) if single else workspace(b * kv_heads, splits, rows, d, acc_torch, query.device)
    programs = b * kv_heads * splits * plan.query_blocks
    if visited_blocks is not None and (
        visited_blocks.dtype != torch.int32 or not visited_blocks.is_contiguous() or visited_blocks.numel() != programs
    ):
        raise ValueError(
            f"decode_attention (Triton): visited_blocks must be a contiguous int32 tensor of "
            f"{programs} elements (b * kv_heads * splits * query_blocks)"
        )
    _attention_partial_kernel[(b * kv_heads, splits, plan.query_blocks)](
        query, keys, values, kv_start, query_slots, out, o_part, lse_part,
        visited_blocks if visited_blocks is not None else kv_start,
        S, t, group, kv_heads, d, splits, sliding_window or 0, scale * math.log2(math.e),
        *query.stride(),
        *keys.stride(),
        *values.stride(),
        kv_start.stride(0), *query_slots.stride(),
        *out.stride(),
        HAS_WINDOW=sliding_window is not None,
        SINGLE_SPLIT=single,
        COUNT_BLOCKS=visited_blocks is not None,
        ACC=acc_tl,
        # fp32 inputs: full-precision products (tl.dot would round them to tf32 on the GPU).
        DOT_PRECISION="ieee" if query.dtype in (torch.float32, torch.float64) else None,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d,
        num_warps=8 if plan.block_m * plan.block_d >= 16384 else 4,
        num_stages=3 if query.is_cuda else 1,
        **launch_options(query.device),
    )
    if not single:
        _attention_combine_kernel[(b * kv_heads, rows)](
            o_part, lse_part, out,
            t, group, kv_heads, d, splits,
            *out.stride(),
            BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
            BLOCK_D=plan.block_d,
            num_warps=4,
            **launch_options(query.device),
        )
    return out
