"""A linear layer for a few rows (decode at small batch): out = x @ weight.T (+ bias).

At batch 1-16 a decode step's matmuls are matrix-vector products bound by reading the weight
once. The 8B profile (BENCHMARKS.md, session 7) found inductor's fused reductions reading the
layers' 8-235 MB matrices at 3.1-3.4 TB/s while the same kind of kernel read the 1 GB LM head at
4.3-4.5 TB/s. The likely cause (not yet measured apart): the smaller matrices give too few
programs, each with a long serial reduction. This kernel splits the reduction dimension as
well (split-K) so that every shape has a few programs
per multiprocessor, each streaming a contiguous stripe of the row-major weight, and adds the
float32 partial sums in a fixed order (the same inputs give the same bits): the split of an n
block that finishes last (an atomic count per block says which) adds them in split order, so one
launch does it all; ``one_launch=False`` or MAMBAIFY_GEMV_ONE_LAUNCH=0 adds them in a second
kernel instead (a launch more per call, up to six calls per layer and step; bench_kernels times
both). One row reduces on the CUDA cores; several rows (a batch, or a speculative verify call's K + 1 tokens)
multiply each weight tile with all of them at once through ``tl.dot``, padded to 16 rows, so the
weight is still read once (session 8's batch-8 step, with a reduction per row over each tile,
ran at 26% of its roofline).
:func:`small_batch_gated_up` computes a gated MLP's silu(x W_gate^T) * (x W_up^T) in one pass
over both matrices, so the MLP's activation costs no kernel of its own. Timed by
``benchmarks/bench_kernels.py --only gemv`` against cuBLAS and inductor; the engines use them on
CUDA by default (``Engine(small_batch_linear="auto")``, faster or equal at every point measured).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from .. import SMALL_BATCH_MAX_ROWS, qkv_read_as_one
from .. import reference
from .pdl import launch_options, wait_for_inputs

MAX_ROWS = SMALL_BATCH_MAX_ROWS  # more rows than this is a matrix product: F.linear (cuBLAS) is the right call


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: a few splits still exercise the sums
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _weight_tiles(w_ptr, w2_ptr, offs_n, mask_n, k, k_end, w_sn, w_sk, BLOCK_K: tl.constexpr, GATED: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) tile of the weight at column k (and of the second matrix with GATED)."""
    offs_k = k + tl.arange(0, BLOCK_K)
    tile = offs_n[:, None].to(tl.int64) * w_sn + offs_k[None, :] * w_sk  # > 2^31 elements: 64-bit
    tile_mask = mask_n[:, None] & (offs_k < k_end)[None, :]
    w = tl.load(w_ptr + tile, mask=tile_mask, other=0.0)
    w2 = w  # read only with GATED
    if GATED:
        w2 = tl.load(w2_ptr + tile, mask=tile_mask, other=0.0)
    return w, w2


@triton.jit
def _accumulate(acc, acc2, ssq, w, w2, x_ptr, g_ptr, z_ptr, offs_m, M, k, k_end, x_sm, x_sk, z_sm, z_sk,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, ACC: tl.constexpr,
                USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM: tl.constexpr, GATE: tl.constexpr):
    """The sums plus every row's products with the weight tiles at column k. NORM: x is the
    RMSNorm's input; its tiles are multiplied by the norm's weight g as they load, and ``ssq``
    (per row) gathers their squares for the norm's scale, applied when the sums are complete.
    GATE (with NORM): the norm's input is x * silu(z), Mamba2's gated RMSNorm."""
    offs_k = k + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_end
    g = tl.zeros((BLOCK_K,), dtype=ACC)  # read only with NORM
    if NORM:
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(ACC)
    if USE_DOT:
        x_mask = (offs_m < M)[:, None] & mask_k[None, :]  # padding rows (past M) load zeros
        xs = tl.load(x_ptr + offs_m[:, None] * x_sm + offs_k[None, :] * x_sk, mask=x_mask, other=0.0)
        if NORM:
            xf = xs.to(ACC)
            if GATE:
                zf = tl.load(z_ptr + offs_m[:, None] * z_sm + offs_k[None, :] * z_sk, mask=x_mask, other=0.0).to(ACC)
                xf = xf * zf * tl.sigmoid(zf)
            ssq += tl.sum(xf * xf, axis=1)
            xs = (xf * g[None, :]).to(xs.dtype)
        if w.dtype != xs.dtype:  # int8 weights (SCALED): their integers exactly in the rows' dtype
            w, w2 = w.to(xs.dtype), w2.to(xs.dtype)
        acc += tl.dot(xs, tl.trans(w), input_precision=DOT_PRECISION, out_dtype=ACC)
        if GATED:
            acc2 += tl.dot(xs, tl.trans(w2), input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        w, w2 = w.to(ACC), w2.to(ACC)
        for m in tl.static_range(BLOCK_M):
            in_rows = (offs_k * 0 + m) < M  # padding rows (past M) load zeros
            x = tl.load(x_ptr + m * x_sm + offs_k * x_sk, mask=mask_k & in_rows, other=0.0).to(ACC)
            if NORM:
                if GATE:
                    z = tl.load(z_ptr + m * z_sm + offs_k * z_sk, mask=mask_k & in_rows, other=0.0).to(ACC)
                    x = x * z * tl.sigmoid(z)
                ssq += tl.where(offs_m == m, tl.sum(x * x), 0.0)
                x = x * g
            acc += tl.where(offs_m[:, None] == m, tl.sum(w * x[None, :], axis=1)[None, :], 0.0)
            if GATED:
                acc2 += tl.where(offs_m[:, None] == m, tl.sum(w2 * x[None, :], axis=1)[None, :], 0.0)
    return acc, acc2, ssq


@triton.jit
def _group_block(w_ptr, wb_ptr, wc_ptr, pid_n, N_A, N_B, N, BLOCK_N: tl.constexpr):
    """Program pid_n of a grouped call (three matrices A, B, C over one input, each starting on a
    block of its own): its matrix, this block's rows in it and their mask, and their columns in
    the output ([A, B, C] side by side)."""
    blocks_a = tl.cdiv(N_A, BLOCK_N)
    blocks_ab = blocks_a + tl.cdiv(N_B, BLOCK_N)
    in_b = pid_n >= blocks_a
    in_c = pid_n >= blocks_ab
    base = w_ptr
    if in_b:
        base = wb_ptr
    if in_c:
        base = wc_ptr
    first_block = tl.where(in_c, blocks_ab, tl.where(in_b, blocks_a, 0))
    first_col = tl.where(in_c, N_A + N_B, tl.where(in_b, N_A, 0))
    rows = tl.where(in_c, N - N_A - N_B, tl.where(in_b, N_B, N_A))
    offs_w = (pid_n - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_w < rows
    return base, offs_w, mask_n, first_col + offs_w


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w2_ptr, bias_ptr, out_ptr, final_ptr, count_ptr, wb_ptr, wc_ptr, g_ptr, ssq_ptr, res_ptr, z_ptr,
    parts_ptr, next_g_ptr, scaled_ptr, next_parts_ptr, scale_ptr, scale2_ptr,
    M, N, K, k_per_split, S, N_A, N_B, eps, P,
    x_sm, x_sk, w_sn, w_sk, o_ss, o_sp, o_sm, o_sn, f_sm, f_sn, q_ss, q_sp, r_sm, r_sn, z_sm, z_sk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    FINAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LAST_SPLIT_SUMS: tl.constexpr,
    GROUPED: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GATE: tl.constexpr,
    PDL: tl.constexpr,
    STAGES: tl.constexpr,
    NORM_PARTS: tl.constexpr,
    PREPARE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Program (n block, k split s): the sums over split s of x[m, k] * w[n, k] for all rows m
    (and of x[m, k] * w2[n, k] when GATED: w the gate, w2 the up projection, read in the same
    pass). FINAL (one split): the result itself, bias added or the gate applied, in the output's
    dtype. Otherwise float32 partial sums into out[s, part], added in split order (so results do
    not depend on scheduling) by :func:`_sum_splits_kernel` or, with LAST_SPLIT_SUMS, here.
    USE_DOT (several rows, BLOCK_M >= 16 with the padding rows zero): each weight tile is
    multiplied with all rows at once by ``tl.dot`` (tensor cores); one row reduces on the CUDA
    cores, where a dot would be 15/16 padding.
    LAST_SPLIT_SUMS (several splits): each program counts itself done on its n block's counter
    (``count_ptr``, zero before the call); the one that finds every other split done adds all
    partial sums in split order (the same bits whichever program it is), writes the result to
    ``final_ptr`` and puts the counter back to zero for the next call. One launch instead of
    this kernel and :func:`_sum_splits_kernel`.
    GROUPED: three matrices over the same rows in one launch (an attention layer's q, k and v
    projections: one launch instead of three), w the first (N_A rows), wb the second (N_B),
    wc the third (the rest of N); their outputs side by side, bias (if any) over all N.
    NORM: x is the input of an RMSNorm with weight ``g_ptr`` (the Llama family's, eps ``eps``)
    that the layer would apply first: the result is that of the normalized rows. Each row's
    scale r = rsqrt(mean(x^2) + eps) factors out of its products, W (r x * g) = r W (x * g), so
    the tiles are multiplied by g as they load, their squares summed on the way (per split into
    ``ssq_ptr``, (S, n blocks, M) float32, with several splits), and r applied where the split
    sums are added: no pass over x before the weights stream, and no norm kernel of its own.
    GATE (with NORM): the norm is Mamba2's gated RMSNorm over the whole row, of x * silu(z), z
    at ``z_ptr`` (M, K) (the mixer's out_proj after its norm).
    RESIDUAL: ``res_ptr`` (M, N) is added to the result (the residual add after an output
    projection), so the next layer's input comes out of this launch.
    PDL (launched as a programmatic dependent launch, Hopper on): the program reads its first
    weight tiles, which no kernel writes, before it waits for the kernel ahead of it (whose
    output may be x), so the weights start streaming while that kernel finishes; then it lets
    the next kernel launch. Everything else (x, every store) comes after the wait.
    NORM_PARTS (a prepared norm): x is already an RMSNorm's input times the norm's weight, and
    ``parts_ptr`` (P, M) holds, per block of columns, each row's sum of squares of the norm's
    input (what a PREPARE launch before this one wrote): the loop is the plain one, and where the
    sums finish they are scaled by rsqrt(sum of the P parts / K + eps), as with NORM.
    PREPARE (with the result the residual stream): the norm after it prepared, for a NORM_PARTS
    launch after this one: the result times ``next_g_ptr`` (the next norm's weight) to
    ``scaled_ptr`` in the output's dtype and layout, and each row's sum of squares of the result
    over this n block's columns to ``next_parts_ptr`` (n blocks, M).
    SCALED: the weights are int8 with a float scale per row, ``scale_ptr`` (N,) indexed by the
    output's columns (grouped: the three matrices' scales side by side; ``scale2_ptr`` the
    second matrix's with GATED): the sums run over the integers, each converted as it loads
    (exact in float32 and in bfloat16), and a column's scale multiplies its sum where it
    finishes, so the loop reads one byte per weight instead of two.
    STAGES: the main loop's software pipelining (``tl.range``'s num_stages). At 1 each tile's
    loads are issued only after the last tile's reduction. At S >= 3 the tiles go through shared
    memory (cp.async), S - 2 of them in flight while the warps reduce the current one. At 2 they
    go through shared memory too, but Triton issues the next tile's copy after the reduction and
    waits for all of it at the next step: nothing overlaps. Several rows (tl.dot) take Triton's
    default, 3, which has pipelined their tiles all along; one row :func:`one_row_stages`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GROUPED:  # offs_w: rows of the program's matrix; offs_n: their columns in the output
        w_base, offs_w, mask_n, offs_n = _group_block(w_ptr, wb_ptr, wc_ptr, pid_n, N_A, N_B, N, BLOCK_N)
    else:
        w_base = w_ptr
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = offs_n
        mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    ssq = tl.zeros((BLOCK_M,), dtype=ACC)
    k_first = k_start
    if PDL:
        w, w2 = _weight_tiles(w_base, w2_ptr, offs_w, mask_n, k_start, k_end, w_sn, w_sk, BLOCK_K, GATED)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        acc, acc2, ssq = _accumulate(acc, acc2, ssq, w, w2, x_ptr, g_ptr, z_ptr, offs_m, M, k_start, k_end, x_sm,
                                     x_sk, z_sm, z_sk, BLOCK_M, BLOCK_K, GATED, ACC, USE_DOT, DOT_PRECISION, NORM,
                                     GATE)
        k_first = k_start + BLOCK_K
    for k in tl.range(k_first, k_end, BLOCK_K, num_stages=STAGES):
        w, w2 = _weight_tiles(w_base, w2_ptr, offs_w, mask_n, k, k_end, w_sn, w_sk, BLOCK_K, GATED)
        acc, acc2, ssq = _accumulate(acc, acc2, ssq, w, w2, x_ptr, g_ptr, z_ptr, offs_m, M, k, k_end, x_sm, x_sk,
                                     z_sm, z_sk, BLOCK_M, BLOCK_K, GATED, ACC, USE_DOT, DOT_PRECISION, NORM, GATE)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    ptrs = out_ptr + pid_k * o_ss + offs_m[:, None] * o_sm + offs_n[None, :] * o_sn
    res = res_ptr + offs_m[:, None] * r_sm + offs_n[None, :] * r_sn
    if FINAL:
        residual = _residual(res, mask, RESIDUAL)
        if NORM_PARTS:
            ssq = _parts_ssq(parts_ptr, P, M, offs_m)
        result = _finish(acc, acc2, bias_ptr, offs_n, mask_n, ssq[:, None], K, eps, residual, scale_ptr, scale2_ptr,
                         GATED, HAS_BIAS, NORM or NORM_PARTS, RESIDUAL, SCALED).to(out_ptr.dtype.element_ty)
        tl.store(ptrs, result, mask=mask)
        if PREPARE:
            _prepare_norm(result, mask, offs_m, offs_n, mask_n, pid_n, M, next_g_ptr,
                          scaled_ptr + offs_m[:, None] * f_sm + offs_n[None, :] * f_sn, next_parts_ptr)
    else:
        tl.store(ptrs, acc, mask=mask)
        if GATED:
            tl.store(ptrs + o_sp, acc2, mask=mask)
        if NORM:
            tl.store(ssq_ptr + pid_k * q_ss + pid_n * q_sp + offs_m, ssq, mask=offs_m < M)
        if LAST_SPLIT_SUMS:
            # Every thread's partial sums are stored before the count (barrier); the count's
            # acquire-release order and reads past L1 (.cg) let the last split see the others'.
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if done == S - 1:
                residual = _residual(res, mask, RESIDUAL)  # in flight with the partial sums
                first = out_ptr + offs_m[:, None] * o_sm + offs_n[None, :] * o_sn
                acc, acc2, ssq = _split_sums(first, mask, S, o_ss, o_sp, ssq, ssq_ptr + pid_n * q_sp + offs_m,
                                             offs_m < M, q_ss, GATED, NORM, ".cg")
                if NORM_PARTS:
                    ssq = _parts_ssq(parts_ptr, P, M, offs_m)
                result = _finish(acc, acc2, bias_ptr, offs_n, mask_n, ssq[:, None], K, eps, residual, scale_ptr,
                                 scale2_ptr, GATED, HAS_BIAS, NORM or NORM_PARTS, RESIDUAL,
                                 SCALED).to(final_ptr.dtype.element_ty)
                final = final_ptr + offs_m[:, None] * f_sm + offs_n[None, :] * f_sn
                tl.store(final, result, mask=mask)
                if PREPARE:
                    _prepare_norm(result, mask, offs_m, offs_n, mask_n, pid_n, M, next_g_ptr,
                                  scaled_ptr + offs_m[:, None] * f_sm + offs_n[None, :] * f_sn, next_parts_ptr)
                tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def _split_part(first, s, S, stride, mask, CACHE: tl.constexpr):
    """Split s's part at ``first`` (split 0's) + s * stride; zeros where s is past the last split."""
    in_range = mask.to(tl.int32) * 0 + s < S  # of mask's shape: the interpreter refuses a scalar & a block
    return tl.load(first + s * stride, mask=in_range & mask, other=0.0, cache_modifier=CACHE)


@triton.jit
def _four_splits(first, s, S, stride, mask, CACHE: tl.constexpr):
    """Splits s to s + 3's parts (:func:`_split_part`), their four loads issued together."""
    return (_split_part(first, s, S, stride, mask, CACHE), _split_part(first, s + 1, S, stride, mask, CACHE),
            _split_part(first, s + 2, S, stride, mask, CACHE), _split_part(first, s + 3, S, stride, mask, CACHE))


@triton.jit
def _split_sums(first, mask, S, p_ss, p_sp, ssq, ssq_first, ssq_mask, q_ss,
                GATED: tl.constexpr, NORM: tl.constexpr, CACHE: tl.constexpr):
    """The partial sums at ``first`` (split 0) and the S - 1 splits after it (``p_ss`` apart),
    added in split order; with GATED also those of the second matrix (``p_sp`` further), with
    NORM the rows' sums of squares at ``ssq_first`` (``q_ss`` apart; else ``ssq`` comes back as
    it is). Four splits' loads are issued before any of their adds: a warp stalls at an add
    until its operand has arrived, so loading and adding one split at a time made the last
    program of each n block wait on the L2 once per split and kind of sum (ten times in a row
    for the 8B out_proj's five splits with its gated norm), where it now waits once per four
    splits. The parts past the last split load as zeros, which leave the sums as they are."""
    acc = tl.load(first, mask=mask, other=0.0, cache_modifier=CACHE)
    acc2 = acc  # read only with GATED
    if GATED:
        acc2 = tl.load(first + p_sp, mask=mask, other=0.0, cache_modifier=CACHE)
    if NORM:
        ssq = tl.load(ssq_first, mask=ssq_mask, other=0.0, cache_modifier=CACHE)
    for s in range(1, S, 4):
        a1, a2, a3, a4 = _four_splits(first, s, S, p_ss, mask, CACHE)
        b1, b2, b3, b4 = a1, a2, a3, a4  # read only with GATED
        if GATED:
            b1, b2, b3, b4 = _four_splits(first + p_sp, s, S, p_ss, mask, CACHE)
        if NORM:
            q1, q2, q3, q4 = _four_splits(ssq_first, s, S, q_ss, ssq_mask, CACHE)
            ssq = ssq + q1 + q2 + q3 + q4
        acc = acc + a1 + a2 + a3 + a4
        if GATED:
            acc2 = acc2 + b1 + b2 + b3 + b4
    return acc, acc2, ssq


@triton.jit
def _residual(res, mask, RESIDUAL: tl.constexpr):
    """The residual at ``res`` to add to the result (RESIDUAL), else zeros that are never used;
    loaded apart from :func:`_finish` so that the load can be issued before the sums wait."""
    value = tl.zeros_like(mask).to(tl.float32)
    if RESIDUAL:
        value = tl.load(res, mask=mask, other=0.0)
    return value


@triton.jit
def _parts_ssq(parts_ptr, P, M, offs_m):
    """Each row's sum of squares (rows ``offs_m``) from the P blocks of columns a PREPARE launch
    summed, ``parts_ptr`` (P, M), added in block order (the same bits every call)."""
    ssq = tl.zeros(offs_m.shape, dtype=parts_ptr.dtype.element_ty)
    offs_p = tl.arange(0, 64)
    for p in range(0, P, 64):
        in_range = ((p + offs_p) < P)[:, None] & (offs_m < M)[None, :]
        ssq += tl.sum(tl.load(parts_ptr + (p + offs_p)[:, None] * M + offs_m[None, :], mask=in_range, other=0.0), axis=0)
    return ssq


@triton.jit
def _prepare_norm(result, mask, offs_m, offs_n, mask_n, block, M, next_g_ptr, scaled, next_parts_ptr):
    """For the RMSNorm after this launch (PREPARE): ``result`` (rows, n; as stored, in the
    stream's dtype) times the norm's weight to ``scaled``, and each row's sum of squares over
    these columns to row ``block`` of ``next_parts_ptr`` (n blocks, M), both computed in the
    parts' dtype (the sums' float32, float64 for float64 inputs)."""
    h = result.to(next_parts_ptr.dtype.element_ty)
    g = tl.load(next_g_ptr + offs_n, mask=mask_n, other=0.0).to(h.dtype)
    tl.store(scaled, (h * g[None, :]).to(scaled.dtype.element_ty), mask=mask)
    tl.store(next_parts_ptr + block * M + offs_m, tl.sum(tl.where(mask, h * h, 0.0), axis=1), mask=offs_m < M)


@triton.jit
def _finish(acc, acc2, bias_ptr, offs_n, mask_n, ssq, K, eps, residual, scale_ptr, scale2_ptr,
            GATED: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
            SCALED: tl.constexpr):
    """The layer's output from its complete sums: with NORM scaled by each row's
    rsqrt(ssq / K + eps) (``ssq``: (rows, 1) for (rows, n) sums, a scalar for one row's), with
    SCALED by each output column's weight scale (``scale_ptr``, ``scale2_ptr`` the second
    matrix's), then bias added, or with GATED silu(gate sums) * up sums; with RESIDUAL the
    ``residual`` (:func:`_residual`) added."""
    if NORM:
        scale = tl.rsqrt(ssq / K + eps)
        acc = acc * scale
        acc2 = acc2 * scale
    if SCALED:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
        if GATED:
            acc2 = acc2 * tl.load(scale2_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if RESIDUAL:
        acc += residual.to(acc.dtype)
    return acc


@triton.jit
def _sum_splits_kernel(
    part_ptr, bias_ptr, out_ptr, ssq_ptr, res_ptr, parts_ptr, next_g_ptr, scaled_ptr, next_parts_ptr,
    scale_ptr, scale2_ptr, S, M, N, K, eps, P,
    p_ss, p_sp, p_sm, p_sn, o_sm, o_sn, q_ss, r_sm, r_sn,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
    NORM_PARTS: tl.constexpr,
    PREPARE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Program (row m, n block): out[m, n] = sum_s part[s, 0, m, n] (+ bias[n]), or with GATED
    silu(sum_s part[s, 0]) * sum_s part[s, 1], in the output dtype; NORM, RESIDUAL, NORM_PARTS,
    PREPARE and SCALED as in :func:`_gemv_kernel` (NORM: the row's sums of squares read from the first n
    block's; PREPARE: a block of sums of squares per BLOCK_N columns)."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    block = tl.program_id(1)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    residual = _residual(res_ptr + m * r_sm + offs_n * r_sn, mask_n, RESIDUAL)
    no_ssq = m * 0.0  # a tensor, as _split_sums returns it without NORM
    acc, acc2, ssq = _split_sums(part_ptr + m * p_sm + offs_n * p_sn, mask_n, S, p_ss, p_sp, no_ssq, ssq_ptr + m,
                                 m >= 0, q_ss, GATED, NORM, "")
    if NORM_PARTS:
        ssq = _parts_ssq(parts_ptr, P, M, m + tl.arange(0, 1))
    result = _finish(acc, acc2, bias_ptr, offs_n, mask_n, ssq, K, eps, residual, scale_ptr, scale2_ptr, GATED,
                     HAS_BIAS, NORM or NORM_PARTS, RESIDUAL, SCALED).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m * o_sm + offs_n * o_sn, result, mask=mask_n)
    if PREPARE:  # row m as a (1, BLOCK_N) block
        _prepare_norm(result[None, :], mask_n[None, :], m + tl.arange(0, 1), offs_n, mask_n, block, M, next_g_ptr,
                      scaled_ptr + m * o_sm + offs_n[None, :] * o_sn, next_parts_ptr)


def plan(n: int, k: int, device: torch.device, block_n: int = 32, block_k: int = 256,
         dot: bool = False) -> tuple[int, int]:
    """(programs along N, reduction splits of whole K blocks): about four programs per
    multiprocessor, a split never shorter than two K blocks. The partial sums cost little: at the
    8B shape's smallest matrix (1024 x 4096, 8 MB) eight splits write and read 64 KB of them.
    ``dot`` (several rows through tl.dot): no split once the n blocks alone give every
    multiprocessor a program. Measured on the H200 at 4 rows (a verify call's K + 1 tokens;
    session 12): unsplit, in_proj, gate+up and q+k+v took 8-16% less time than split as for one
    row, while the matrices of fewer n blocks than multiprocessors (k/v, o, down) kept gaining
    from the split."""
    programs_n = triton.cdiv(n, block_n)
    if dot and programs_n >= _num_sms(device):
        return programs_n, 1
    splits = max(1, min(triton.cdiv(4 * _num_sms(device), programs_n), k // (2 * block_k)))
    return programs_n, _whole_blocks(k, splits, block_k)[1]


def _whole_blocks(k: int, splits: int, block_k: int) -> tuple[int, int]:
    """(K per split, splits) for about ``splits`` splits of whole K blocks (the last may be short)."""
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


# Per device, the n blocks' "splits done" counters of the one-launch split sums: zeros, and put
# back to zero by every call, so one buffer serves every call and every CUDA-graph replay on a
# stream (calls on one stream never overlap). Allocated on first use, never freed or replaced: a
# captured graph keeps pointing at it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_PROGRAMS_N = 1 << 16  # n blocks per call: a 2M-row weight at block_n 32


def _split_counters(device: torch.device, programs_n: int) -> torch.Tensor:
    if programs_n > MAX_PROGRAMS_N:
        raise ValueError(f"small_batch_linear: {programs_n} blocks along N exceed {MAX_PROGRAMS_N}; "
                         f"give a larger block_n or pass one_launch=False")
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("small_batch_linear: run it once before capturing a CUDA graph (its counters "
                               "are allocated on first use), as a graph's warm-up does")
        counters = _COUNTERS[device] = torch.zeros(MAX_PROGRAMS_N, dtype=torch.int32, device=device)
    return counters


def one_launch_default() -> bool:
    """The split sums' default: in the GEMV's own launch, unless MAMBAIFY_GEMV_ONE_LAUNCH=0 (a
    switch, like the engines' fast paths, to go back to the second kernel without touching code)."""
    return os.environ.get("MAMBAIFY_GEMV_ONE_LAUNCH", "1") != "0"


DEFAULT_CONFIG = (32, 256, 4)  # (block_n, block_k, num_warps)
SUM_SPLITS_BLOCK = 256  # columns per program of the split sums' own kernel (one_launch=False)
# Several rows (tl.dot) where the plan splits K: K blocks of 128. At 256 the dot's pipelined
# tiles take 48 KB of shared memory per program against 24 KB (sm_90, triton 3.6, as launched),
# so 4 programs fit a multiprocessor instead of 9, and down_proj's 640 (128 n blocks x 5
# splits) take 1.21 waves instead of 0.54. On the H200 at 4 rows (bench_kernels.py --only
# gemv-fused, session 13) 128 took down_proj (4096 x 14336, five splits) from 39.5 to 32.8 us,
# o_proj from 14.1 to 13.6 and Mamba's out_proj from 17.0 to 16.4,
# while the unsplit q+k+v and in_proj were faster at 256 (18.0 against 20.7 us, 22.2 against
# 23.4), as was every matrix at one row but gate and up timed as one 28672-row matrix (56.7 us
# at 128 against 60.7). In the 8B verify call (session 16) it ran with the unsplit plan at 4.77
# ms against session 13's 5.03.
SPLIT_DOT_CONFIG = (32, 128, 4)
# One row with gate and up read together (GATED): K blocks of 128. Each K step loads a tile of
# both matrices, so at 256 a program holds twice the weights of the one-matrix kernel: compiled
# for sm_90 as the engine launches it (triton 3.6, its norm folded in), it takes 96 registers per
# thread against 64 at 128, so 5 programs fit a multiprocessor instead of 8, and the 8B gate+up
# call's 896 planned programs (448 n blocks x 2 splits) take 1.36 waves of the H200's 132
# multiprocessors instead of 0.85: a second, partly filled wave. Call 4 of session 13 saw the
# same at one row for gate and up as one 28672-row matrix, the only matrix there whose grid at
# 256 (896 programs) overran one wave: 56.7 us at 128 against 60.7; every matrix whose grid fit
# was faster at 256. The 8B 0% hybrid's batch-1 step (session 16): 4.46 ms against 4.70 with
# gate and up at 256 (MAMBAIFY_GEMV_CONFIG=32,256,4).
GATED_ONE_ROW_CONFIG = (32, 128, 4)
# Pipeline stages of the main loop (see STAGES). Several rows: Triton's default for a loop that
# feeds tl.dot, what they have always run with. One row: none by default (the loop as measured in
# sessions 8-13); MAMBAIFY_GEMV_STAGES=3 keeps the next tile streaming while the current one is
# reduced (2 does not: its PTX waits for every copy before each step). Compiled for sm_90 (triton
# 3.6's ptxas) with 3 stages, the 8B one-row calls fit 6 programs per multiprocessor against 5-8
# (33-36 KB of shared memory each), which takes gate+up at K blocks of 128 from 0.85 to 1.13
# waves; with 4, most fit 4 (50-54 KB). Measured slower all the same: the 8B 0% hybrid's
# batch-1 step took 5.12 ms at 3 stages and 5.05 at 4, against 4.46 at 1 (session 16), so the
# one-row loop stays as it was.
DOT_STAGES = 3
ONE_ROW_STAGES = 1


def one_row_stages(stages: int | None = None) -> int:
    """The one-row loop's pipeline stages: ``stages`` where given, else MAMBAIFY_GEMV_STAGES
    where set, else ONE_ROW_STAGES; 1 (none) to 4."""
    if stages is not None:
        if not isinstance(stages, int) or not 1 <= stages <= 4:
            raise ValueError(f"stages={stages!r}: give the one-row GEMV's pipeline stages, 1 (none) to 4")
        return stages
    text = os.environ.get("MAMBAIFY_GEMV_STAGES", "").strip()
    if not text:
        return ONE_ROW_STAGES
    if not text.isdigit() or not 1 <= int(text) <= 4:
        raise ValueError(f"MAMBAIFY_GEMV_STAGES={text!r}: give the one-row GEMV's pipeline stages, 1 (none) to 4, "
                         f"or unset it")
    return int(text)


# The configurations MAMBAIFY_GEMV_TUNE=1 times (bench_kernels.py --only gemv compares a like
# set; session 8 found a different one fastest for each 8B matrix, none of them the default).
TUNE_CONFIGS = [(bn, bk, w) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8)]


def default_config(m: int, n: int, k: int, device: torch.device, gated: bool = False) -> tuple[int, int, int]:
    """The launch configuration of an (m rows, n x k weight) call that names none (untuned):
    MAMBAIFY_GEMV_CONFIG where set (:func:`forced_config`), else SPLIT_DOT_CONFIG for several
    rows where the plan splits K, GATED_ONE_ROW_CONFIG for one row through two matrices
    (``gated``), DEFAULT_CONFIG otherwise."""
    forced = forced_config()
    if forced is not None:
        return forced
    if m > 1 and plan(n, k, device, *DEFAULT_CONFIG[:2], dot=True)[1] > 1:
        return SPLIT_DOT_CONFIG
    if m == 1 and gated:
        return GATED_ONE_ROW_CONFIG
    return DEFAULT_CONFIG


def forced_config() -> tuple[int, int, int] | None:
    """MAMBAIFY_GEMV_CONFIG="block_n,block_k,num_warps": one launch configuration for every call
    that names none, in place of :func:`default_config`'s choice (to time a step at another
    configuration without touching code, e.g. 32,256,4, session 13's at one row); None where unset."""
    text = os.environ.get("MAMBAIFY_GEMV_CONFIG", "").strip()
    if not text:
        return None
    try:
        block_n, block_k, num_warps = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"MAMBAIFY_GEMV_CONFIG={text!r}: give three integers, block_n,block_k,num_warps "
                         f"(e.g. 32,256,4), or unset it") from None
    powers = all(v > 0 and v & (v - 1) == 0 for v in (block_n, block_k, num_warps))
    if not powers or num_warps > 32:
        raise ValueError(f"MAMBAIFY_GEMV_CONFIG={text!r}: block_n, block_k and num_warps (at most 32) must be "
                         f"powers of two, e.g. 32,256,4")
    return block_n, block_k, num_warps


# Per call shape (rows, matrices' rows, K, dtype, gated, device): the configuration timed fastest.
_TUNED: dict[tuple, tuple[int, int, int]] = {}


def tune_default() -> bool:
    """Whether a call without an explicit configuration times TUNE_CONFIGS on its first use of a
    shape and keeps the fastest (MAMBAIFY_GEMV_TUNE=1; off by default: on the H200 the
    0% hybrid's 8B step took 4.94 ms with it against 4.99 without, within run-to-run noise)."""
    return os.environ.get("MAMBAIFY_GEMV_TUNE", "0") == "1"


def _can_time(device: torch.device) -> bool:
    # Timing needs a GPU, and no CUDA graph capture in progress (an engine's first call of a
    # shape is its warm-up, before the capture).
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _time_config(config: tuple[int, int, int], run: Callable[[], torch.Tensor]) -> float:
    """Median milliseconds of ``run`` (triton's do_bench flushes the L2 cache between calls, so
    the weights are read from HBM as in a decode step)."""
    return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")


def _tuned(rows, mats, up, bias, splits, one_launch) -> tuple[int, int, int]:
    key = (rows.shape[0], tuple(w.shape[0] for w in mats), rows.shape[1], rows.dtype, mats[0].dtype, up is not None,
           rows.device)
    if key not in _TUNED:
        weight = mats if len(mats) > 1 else mats[0]
        timings = {}
        for config in TUNE_CONFIGS:
            def run(config=config):
                return _launch(rows, weight, up, bias, *config, splits, one_launch)
            try:
                timings[config] = _time_config(config, run)
            except Exception:  # a configuration this GPU refuses (registers, shared memory)
                continue
        fallback = default_config(rows.shape[0], sum(w.shape[0] for w in mats), rows.shape[1], rows.device,
                                  gated=up is not None)
        _TUNED[key] = min(timings, key=timings.get) if timings else fallback
    return _TUNED[key]


def _launch(rows: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, ...], up: torch.Tensor | None,
            bias: torch.Tensor | None, block_n: int | None, block_k: int | None, num_warps: int | None,
            splits: int | None, one_launch: bool | None, norm_weight: torch.Tensor | None = None,
            norm_eps: float = 0.0, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
            stages: int | None = None, norm_parts: torch.Tensor | None = None,
            prepare: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
            up_scale: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel over one weight, or a group of three (same K and strides; outputs side by side).
    A configuration left None: :func:`default_config`'s, or the tuned one (:func:`tune_default`).
    ``norm_weight``/``norm_eps``: the rows are an RMSNorm's input (see NORM); ``residual``
    (m, n): added to the result; ``gate`` (m, k): the norm is gated by it (see GATE).
    ``stages``: the one-row loop's pipeline stages (None: :func:`one_row_stages`).
    ``norm_parts`` (blocks, m): the rows are a norm's input times its weight, the parts its
    sums of squares (see NORM_PARTS). ``prepare`` (n,): the next norm's weight; then the result
    comes with that norm's inputs prepared, (out, out * weight, sums of squares (blocks, m)),
    blocks as :func:`prepared_blocks` says (see PREPARE; such a call is never tuned, so that
    the blocks are known before it runs). ``weight_scale`` (n,), ``up_scale`` (n,) with ``up``:
    the weights are int8, these their rows' scales (see SCALED)."""
    m, k = rows.shape
    grouped = isinstance(weight, tuple)
    mats = weight if grouped else (weight,)
    n = sum(w.shape[0] for w in mats)
    tune = tune_default() and forced_config() is None and prepare is None  # a forced configuration outranks tuning
    if block_n is None and block_k is None and num_warps is None and tune and _can_time(rows.device):
        block_n, block_k, num_warps = _tuned(rows, mats, up, bias, splits, one_launch)
    block_n, block_k, num_warps = (given or default for given, default in zip(
        (block_n, block_k, num_warps), default_config(m, n, k, rows.device, gated=up is not None)))
    weight = mats[0]
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    # tl.dot takes tiles of at least 16 in every dimension; float32 inputs keep full precision
    # ("ieee", not tf32), half-precision ones multiply exactly anyway (the precision is ignored).
    use_dot = m > 1 and block_n >= 16 and block_k >= 16
    planned = plan(n, k, rows.device, block_n, block_k, dot=use_dot)[1]
    programs_n = sum(triton.cdiv(w.shape[0], block_n) for w in mats)  # each matrix from a block of its own
    k_per_split, splits = _whole_blocks(k, splits or planned, block_k)
    gated, parts = up is not None, 2 if up is not None else 1
    block_m = max(16, triton.next_power_of_2(m)) if use_dot else triton.next_power_of_2(m)
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    # One split writes the result itself; several write float32 partial sums, added up by the
    # last split to finish (one_launch) or by a second kernel.
    part = out[None, None] if splits == 1 else torch.empty(splits, parts, m, n, dtype=acc_dtype, device=rows.device)
    last_sums = (one_launch_default() if one_launch is None else one_launch) and splits > 1
    counters = _split_counters(rows.device, programs_n) if last_sums else out
    norm = norm_weight is not None
    # Each split's sums of squares of each row, per n block (every n block's last split adds its
    # own, in split order), where the norm's scale waits for several splits.
    ssq = torch.empty(splits, programs_n, m, dtype=acc_dtype, device=rows.device) if norm and splits > 1 else part
    res = residual if residual is not None else out
    z = gate if gate is not None else rows
    pdl = launch_options(rows.device)
    wb, wc = mats[1:] if grouped else (weight, weight)
    parts_in = norm_parts if norm_parts is not None else out
    scaled, parts_out = out, out
    scale = weight_scale if weight_scale is not None else out
    scale2 = up_scale if up_scale is not None else scale
    if prepare is not None:  # the next norm's inputs, in blocks of the kernel that writes the result
        blocks = programs_n if splits == 1 or last_sums else triton.cdiv(n, SUM_SPLITS_BLOCK)
        scaled, parts_out = torch.empty_like(out), torch.empty(blocks, m, dtype=acc_dtype, device=rows.device)
    _gemv_kernel[(programs_n, splits)](
        rows, weight, up if gated else weight, bias if bias is not None else weight, part, out, counters, wb, wc,
        norm_weight if norm else weight, ssq, res, z, parts_in, prepare if prepare is not None else out, scaled,
        parts_out, scale, scale2,
        m, n, k, k_per_split, splits, mats[0].shape[0], mats[1].shape[0] if grouped else 0, float(norm_eps),
        parts_in.shape[0] if norm_parts is not None else 0,
        *rows.stride(), *weight.stride(), *part.stride(), *out.stride(), ssq.stride(0), ssq.stride(1),
        *res.stride(), *z.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, FINAL=splits == 1,
        HAS_BIAS=bias is not None, ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        USE_DOT=use_dot, DOT_PRECISION="tf32" if rows.dtype in (torch.bfloat16, torch.float16) else "ieee",
        LAST_SPLIT_SUMS=last_sums, GROUPED=grouped, NORM=norm, RESIDUAL=residual is not None,
        GATE=norm and gate is not None, STAGES=DOT_STAGES if use_dot else one_row_stages(stages),
        NORM_PARTS=norm_parts is not None, PREPARE=prepare is not None and (splits == 1 or last_sums),
        SCALED=weight_scale is not None, num_warps=num_warps, **pdl,
    )
    if splits > 1 and not last_sums:
        _sum_splits_kernel[(m, triton.cdiv(n, SUM_SPLITS_BLOCK))](
            part, bias if bias is not None else weight, out, ssq, res, parts_in,
            prepare if prepare is not None else out, scaled, parts_out, scale, scale2,
            splits, m, n, k, float(norm_eps), parts_in.shape[0] if norm_parts is not None else 0,
            *part.stride(), *out.stride(), ssq.stride(0), *res.stride(),
            BLOCK_N=SUM_SPLITS_BLOCK, GATED=gated, HAS_BIAS=bias is not None, NORM=norm, RESIDUAL=residual is not None,
            NORM_PARTS=norm_parts is not None, PREPARE=prepare is not None, SCALED=weight_scale is not None, **pdl,
        )
    return out if prepare is None else (out, scaled, parts_out)


def prepared_blocks(m: int, n: int, k: int, device: torch.device, one_launch: bool | None = None) -> int:
    """The blocks of columns whose sums of squares a ``prepare`` call over an (m rows, n x k
    weight) leaves (:func:`_launch`), at the default configuration: one per n block where the
    GEMV's launch writes the result, else one per block of the split sums' own kernel."""
    block_n, block_k, _ = default_config(m, n, k, device)
    use_dot = m > 1 and block_n >= 16 and block_k >= 16
    splits = _whole_blocks(k, plan(n, k, device, block_n, block_k, dot=use_dot)[1], block_k)[1]
    in_launch = splits == 1 or (one_launch_default() if one_launch is None else one_launch)
    return triton.cdiv(n, block_n) if in_launch else triton.cdiv(n, SUM_SPLITS_BLOCK)


def _rows(x: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{name}: x has {k} features, weight is {tuple(weight.shape)}")
    return x.reshape(-1, k)


def _check_fused(x: torch.Tensor, n: int, norm_weight: torch.Tensor | None, residual: torch.Tensor | None,
                 name: str) -> torch.Tensor | None:
    """The residual as (rows, n), after checking both fused operands against x and the output."""
    if norm_weight is not None and norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: norm_weight {tuple(norm_weight.shape)} for x of {x.shape[-1]} features")
    if residual is None:
        return None
    if residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"{name}: residual {tuple(residual.shape)}, expected the output's {(*x.shape[:-1], n)}")
    return residual.reshape(-1, n)


def _check_parts(x: torch.Tensor, norm_parts: torch.Tensor | None, norm_weight: torch.Tensor | None,
                 name: str) -> None:
    """A prepared norm's sums of squares: (blocks, rows of x) in float32 or float64, alone."""
    if norm_parts is None:
        return
    if norm_weight is not None:
        raise ValueError(f"{name}: give norm_weight (x is the norm's input) or norm_parts (x is already "
                         f"times the norm's weight), not both")
    rows = x.numel() // x.shape[-1]
    if norm_parts.dim() != 2 or norm_parts.shape[1] != rows or not norm_parts.is_floating_point():
        raise ValueError(f"{name}: norm_parts {tuple(norm_parts.shape)} {norm_parts.dtype}, expected (blocks, {rows}) "
                         f"sums of squares, as small_batch_linear_prepare_norm leaves them")


def _check_scale(weights: tuple[torch.Tensor, ...], scale: torch.Tensor | None, n: int, name: str,
                 label: str = "weight_scale") -> None:
    """An int8 weight comes with its rows' scales, (n,) floating point, and only an int8 one."""
    quantized = [w.dtype == torch.int8 for w in weights]
    if any(quantized) != (scale is not None) or (any(quantized) and not all(quantized)):
        raise ValueError(f"{name}: int8 weights need {label} (one scale per row) and other weights take none; got "
                         f"{', '.join(str(w.dtype) for w in weights)} with {label} "
                         f"{'None' if scale is None else tuple(scale.shape)}")
    if scale is not None and (scale.shape != (n,) or not scale.is_floating_point()):
        raise ValueError(f"{name}: {label} {tuple(scale.shape)} {scale.dtype}, expected ({n},) floating point")


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None, splits: int | None = None,
    one_launch: bool | None = None, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
    residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, stages: int | None = None,
    norm_parts: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., K) of at most MAX_ROWS rows, weight (N, K),
    bias (N) or None; float32 accumulation (float64 for float64 inputs), the result in x's
    dtype. More rows go to ``F.linear``. ``splits``: the reduction's splits (None: :func:`plan`).
    ``one_launch``: the last split to finish adds the splits' sums (else a second kernel does;
    the same bits either way); None: :func:`one_launch_default`. ``block_n``, ``block_k``,
    ``num_warps``: the launch configuration; all None: :func:`default_config`, or with
    MAMBAIFY_GEMV_TUNE=1 on a GPU the fastest of TUNE_CONFIGS, timed on a shape's first call.
    ``norm_weight``, ``norm_eps``: x is the input of the Llama family's RMSNorm with this
    weight, applied first (:func:`mambaify.ops.reference.rms_norm`; in the kernel folded into
    the product, see NORM); ``residual`` (x's leading dims, N): added to the result. ``gate``
    (x's shape, with ``norm_weight``): the norm is Mamba2's gated RMSNorm of x * silu(gate) over
    the whole row (:func:`mambaify.ops.gated_rmsnorm`). ``stages``: one row's loop pipelined
    over this many stages (None: :func:`one_row_stages`); several rows keep DOT_STAGES.
    ``norm_parts`` (with ``norm_eps``, instead of ``norm_weight``): x is an RMSNorm's input
    already times the norm's weight, and these its rows' sums of squares in blocks of columns,
    as :func:`small_batch_linear_prepare_norm` leaves both (see NORM_PARTS). ``weight_scale`` (N,):
    the weight is int8 and these its rows' scales (see SCALED)."""
    rows = _rows(x, weight, "small_batch_linear")
    n = weight.shape[0]
    _check_scale((weight,), weight_scale, n, "small_batch_linear")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"small_batch_linear: bias {tuple(bias.shape)} for a weight of {n} rows")
    res = _check_fused(x, n, norm_weight, residual, "small_batch_linear")
    _check_parts(x, norm_parts, norm_weight, "small_batch_linear")
    if gate is not None and (norm_weight is None or gate.shape != x.shape):
        raise ValueError(f"small_batch_linear: a gate {tuple(gate.shape)} needs norm_weight and x's shape "
                         f"{tuple(x.shape)}")
    if not 0 < rows.shape[0] <= MAX_ROWS:
        return reference.small_batch_linear(x, weight, bias, norm_weight, norm_eps, residual, gate, norm_parts,
                                            weight_scale)
    return _launch(rows, weight, None, bias, block_n, block_k, num_warps, splits, one_launch, norm_weight, norm_eps,
                   res, None if gate is None else gate.reshape(-1, gate.shape[-1]), stages,
                   norm_parts, weight_scale=weight_scale).reshape(*x.shape[:-1], n)


def small_batch_linear_prepare_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
    next_norm_weight: torch.Tensor, one_launch: bool | None = None, weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual stream h = residual + ``F.linear(x, weight, bias)`` (x of at most MAX_ROWS
    rows), and with it the inputs of the RMSNorm after it, prepared in the same launch for the
    GEMV that follows the norm (``norm_parts``): (h, h times ``next_norm_weight`` in h's dtype,
    each row's sums of squares of h in blocks of columns, (blocks, rows) float32). The GEMV
    after the norm then runs none of the norm's work in its loop. Always at the default
    configuration (:func:`prepared_blocks` says how many blocks); more rows: PyTorch, one block.
    ``weight_scale``: as for :func:`small_batch_linear`."""
    rows = _rows(x, weight, "small_batch_linear_prepare_norm")
    n = weight.shape[0]
    _check_scale((weight,), weight_scale, n, "small_batch_linear_prepare_norm")
    res = _check_fused(x, n, None, residual, "small_batch_linear_prepare_norm")
    if res is None or next_norm_weight.shape != (n,):
        raise ValueError(f"small_batch_linear_prepare_norm: a residual {(*x.shape[:-1], n)} and a next norm weight "
                         f"({n},) are needed")
    if not 0 < rows.shape[0] <= MAX_ROWS:
        return reference.small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight, weight_scale)
    out, scaled, parts = _launch(rows, weight, None, bias, None, None, None, None, one_launch, residual=res,
                                 prepare=next_norm_weight, weight_scale=weight_scale)
    return out.reshape(*x.shape[:-1], n), scaled.reshape(*x.shape[:-1], n), parts


def small_batch_qkv(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None, v_bias: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None, splits: int | None = None,
    one_launch: bool | None = None, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
    stages: int | None = None, norm_parts: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.cat([F.linear(x, q, q_bias), F.linear(x, k, k_bias), F.linear(x, v, v_bias)], -1)``
    in one launch, for x (..., K) of at most MAX_ROWS rows and q, k, v (N_q, K), (N_k, K), (N_v, K)
    alike in dtype and layout: an attention layer's three projections, read in one pass as if
    they were one matrix, without copying them into one. More rows go to ``F.linear``.
    ``norm_weight``, ``norm_eps``, ``stages``, ``norm_parts``: as for :func:`small_batch_linear`
    (the norm: the layer's input norm). ``weight_scale`` (N_q + N_k + N_v,): the three are int8,
    these their rows' scales side by side."""
    rows = _rows(x, q, "small_batch_qkv")
    mats = (q, k, v)
    if not qkv_read_as_one(*mats):
        raise ValueError("small_batch_qkv: q, k and v must be contiguous (N, K) matrices of one K and dtype, got "
                         + ", ".join(f"{tuple(w.shape)} {w.dtype} strides {w.stride()}" for w in mats))
    biases = (q_bias, k_bias, v_bias)
    n = sum(w.shape[0] for w in mats)
    _check_fused(x, n, norm_weight, None, "small_batch_qkv")
    _check_parts(x, norm_parts, norm_weight, "small_batch_qkv")
    _check_scale(mats, weight_scale, n, "small_batch_qkv")
    if not 0 < rows.shape[0] <= MAX_ROWS:
        return reference.small_batch_qkv(x, *mats, *biases, norm_weight, norm_eps, norm_parts, weight_scale)
    bias = None
    if any(b is not None for b in biases):  # one bias over the three outputs (absent ones as zeros)
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, mats)])
    return _launch(rows, mats, None, bias, block_n, block_k, num_warps, splits, one_launch, norm_weight,
                   norm_eps, stages=stages, norm_parts=norm_parts, weight_scale=weight_scale).reshape(*x.shape[:-1], n)


def small_batch_gated_up(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None, splits: int | None = None,
    one_launch: bool | None = None, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
    stages: int | None = None, norm_parts: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(x gate^T) * (x up^T)``, the first half of a gated (SwiGLU) MLP, for x (..., K) of at
    most MAX_ROWS rows and gate, up (N, K): both matrices read in one pass, the activation applied
    as the sums finish. More rows go to PyTorch. ``one_launch``, ``norm_weight``, ``norm_eps``,
    ``stages``, ``norm_parts``: as for :func:`small_batch_linear` (the norm: the layer's
    post-attention norm). ``gate_scale``, ``up_scale`` (N,): both matrices are int8, these their
    rows' scales."""
    rows = _rows(x, gate, "small_batch_gated_up")
    if up.shape != gate.shape:
        raise ValueError(f"small_batch_gated_up: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    n = gate.shape[0]
    _check_fused(x, n, norm_weight, None, "small_batch_gated_up")
    _check_parts(x, norm_parts, norm_weight, "small_batch_gated_up")
    _check_scale((gate,), gate_scale, n, "small_batch_gated_up", "gate_scale")
    _check_scale((up,), up_scale, n, "small_batch_gated_up", "up_scale")
    if gate.dtype != up.dtype:
        raise ValueError(f"small_batch_gated_up: gate ({gate.dtype}) and up ({up.dtype}) must be alike, both int8 "
                         "with their scales or both floating point")
    if not 0 < rows.shape[0] <= MAX_ROWS:
        return reference.small_batch_gated_up(x, gate, up, norm_weight, norm_eps, norm_parts, gate_scale, up_scale)
    return _launch(rows, gate, up, None, block_n, block_k, num_warps, splits, one_launch, norm_weight,
                   norm_eps, stages=stages, norm_parts=norm_parts, weight_scale=gate_scale,
                   up_scale=up_scale).reshape(*x.shape[:-1], n)
