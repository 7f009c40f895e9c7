"""A linear layer for a few rows (decode at small batch): out = x @ weight.T (+ bias).

At batch 1-16 a decode step's matmuls are matrix-vector products bound by reading the weight
once. The 8B profile (BENCHMARKS.md, session 7) found inductor's fused reductions reading the
layers' 8-235 MB matrices at 3.1-3.4 TB/s while the same kind of kernel read the 1 GB LM head at
4.3-4.5 TB/s: the small matrices give too few programs, each with a long serial reduction. This
kernel splits the reduction dimension as well (split-K) so that every shape has a few programs
per multiprocessor, each streaming a contiguous stripe of the row-major weight, and adds the
partial sums atomically in float32. It is a candidate measured by ``benchmarks/bench_kernels.py
--only gemv`` against cuBLAS and inductor; nothing in the engine calls it yet.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # more rows than this is a matrix product: F.linear (cuBLAS) is the right call


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: a few splits still exercise the sums
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    x_sm, x_sk, w_sn, w_sk, o_ss, o_sm, o_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (n block, k split s): out[s, m, n] = sum_{k in split s} x[m, k] * w[n, k], for all
    rows m. The weight tile is loaded once and used for every row. With one split the result is
    final (bias added, stored in the output's dtype); with several, :func:`_sum_splits_kernel`
    adds them up in a fixed order, so results do not depend on scheduling (no atomics)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        w = tl.load(w_ptr + offs_n[:, None] * w_sn + offs_k[None, :] * w_sk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(ACC)
        for m in tl.static_range(BLOCK_M):
            in_rows = (offs_k * 0 + m) < M  # padding rows (past M) load zeros
            x = tl.load(x_ptr + m * x_sm + offs_k * x_sk, mask=mask_k & in_rows, other=0.0).to(ACC)
            row = tl.sum(w * x[None, :], axis=1)
            acc += tl.where(offs_m[:, None] == m, row[None, :], 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    ptrs = out_ptr + pid_k * o_ss + offs_m[:, None] * o_sm + offs_n[None, :] * o_sn
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(
    part_ptr, bias_ptr, out_ptr,
    S, M, N,
    p_ss, p_sm, p_sn, o_sm, o_sn,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Program (row m, n block): out[m, n] = sum_s part[s, m, n] (+ bias[n]), in the output dtype."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=part_ptr.dtype.element_ty)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * p_ss + m * p_sm + offs_n * p_sn, mask=mask_n, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
    tl.store(out_ptr + m * o_sm + offs_n * o_sn, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def plan(n: int, k: int, device: torch.device, block_n: int = 32, block_k: int = 256) -> tuple[int, int]:
    """(programs along N, reduction splits of whole K blocks): about four programs per
    multiprocessor, a split never shorter than two K blocks. The partial sums cost little: at the
    8B shape's smallest matrix (1024 x 4096, 8 MB) eight splits write and read 64 KB of them."""
    programs_n = triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(4 * _num_sms(device), programs_n), k // (2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return programs_n, triton.cdiv(k, k_per_split)


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    block_n: int = 32, block_k: int = 256, num_warps: int = 4,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., K) of at most MAX_ROWS rows, weight (N, K),
    bias (N) or None; float32 accumulation (float64 for float64 inputs), the result in x's
    dtype. More rows go to ``F.linear``."""
    *lead, k = x.shape
    n = weight.shape[0]
    if weight.shape != (n, k) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"small_batch_linear: x has {k} features, weight is {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if m > MAX_ROWS or m == 0:
        return torch.nn.functional.linear(x, weight, bias)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    programs_n, splits = plan(n, k, x.device, block_n, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # One split writes the result itself; several write float32 partial sums, added up after.
    part = out[None] if splits == 1 else torch.empty(splits, m, n, dtype=acc_dtype, device=x.device)
    _gemv_kernel[(programs_n, splits)](
        rows, weight, bias if bias is not None else weight, part,
        m, n, k, k_per_split,
        *rows.stride(), *weight.stride(), *part.stride(),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None and splits == 1, ACC=acc, num_warps=num_warps,
    )
    if splits > 1:
        sum_block = 256
        _sum_splits_kernel[(m, triton.cdiv(n, sum_block))](
            part, bias if bias is not None else weight, out,
            splits, m, n, *part.stride(), *out.stride(),
            BLOCK_N=sum_block, HAS_BIAS=bias is not None,
        )
    return out.reshape(*lead, n)
