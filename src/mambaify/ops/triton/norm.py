"""Gated RMSNorm, forward and backward: out = weight * RMSNorm(y * silu(z)) over the last dim.

It computes exactly what :class:`mambaify.models.modeling.GatedRMSNorm` computes (float32 or
wider inside, the normalised row rounded to y's dtype before the weight), one row per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _acc_dtype, _num_sms
from .pdl import launch_options, wait_for_inputs


@triton.jit
def _gated_rmsnorm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr,
    N,
    y_stride, z_stride, out_stride,
    eps,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """For row r:  u = y[r] * silu(z[r]);  rstd[r] = 1 / sqrt(mean(u^2) + eps);
    out[r] = weight * (u * rstd[r]) (rounded to y's dtype before the weight, as the module does)."""
    wait_for_inputs(PDL)
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    y = tl.load(y_ptr + r * y_stride + cols, mask=mask, other=0.0).to(ACC)
    z = tl.load(z_ptr + r * z_stride + cols, mask=mask, other=0.0).to(ACC)
    u = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / N + eps)
    h = (u * rstd).to(y_ptr.dtype.element_ty).to(ACC)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + r * out_stride + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r, rstd)


@triton.jit
def _gated_rmsnorm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr,
    M, N,
    y_stride, z_stride, dout_stride, dy_stride, dz_stride,
    ROWS_PER_PROGRAM,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward of the forward above for rows [pid * R, (pid + 1) * R), with s = silu(z),
    u = y * s, h = u * rstd and g = dout * weight:

        du = rstd * (g - h * mean(g * h))          (RMSNorm)
        dy = du * s,   dz = du * y * sigmoid(z) * (1 + z * (1 - sigmoid(z)))
        dw_partial[pid] = sum over the rows of dout * h      (summed over programs by the caller)
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    for i in range(ROWS_PER_PROGRAM):
        r = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        if r < M:  # the last program may hold fewer rows
            y = tl.load(y_ptr + r * y_stride + cols, mask=mask_c, other=0.0).to(ACC)
            z = tl.load(z_ptr + r * z_stride + cols, mask=mask_c, other=0.0).to(ACC)
            dout = tl.load(dout_ptr + r * dout_stride + cols, mask=mask_c, other=0.0).to(ACC)
            rstd = tl.load(rstd_ptr + r).to(ACC)
            sig = tl.sigmoid(z)
            s = z * sig
            h = y * s * rstd
            g = dout * w
            dw += dout * h.to(y_ptr.dtype.element_ty).to(ACC)
            du = rstd * (g - h * (tl.sum(g * h, axis=0) / N))
            tl.store(dy_ptr + r * dy_stride + cols, (du * s).to(dy_ptr.dtype.element_ty), mask=mask_c)
            dz = du * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + r * dz_stride + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask_c)
    tl.store(dw_ptr + pid * N + cols, dw, mask=mask_c)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Kernels index rows by one stride and columns densely; a split of in_proj's output (z) is
    # such a view already, anything else is copied.
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 512, 1), 16)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape, N = y.shape, y.shape[-1]
        y2, z2 = _rows(y), _rows(z)
        M = y2.shape[0]
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        out = torch.empty(M, N, dtype=torch.promote_types(weight.dtype, y.dtype), device=y.device)
        rstd = torch.empty(M, dtype=acc, device=y.device)
        block_n = triton.next_power_of_2(N)
        if M:
            _gated_rmsnorm_fwd_kernel[(M,)](
                y2, z2, weight, out, rstd, N, y2.stride(0), z2.stride(0), out.stride(0), eps,
                BLOCK_N=block_n, ACC=_acc_dtype(y), num_warps=_num_warps(block_n), **launch_options(y.device),
            )
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.shapes = (shape, z.shape)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        y2, z2, weight, rstd = ctx.saved_tensors
        y_shape, z_shape = ctx.shapes
        M, N = y2.shape
        dout2 = _rows(dout)
        dy = torch.empty(M, N, dtype=y2.dtype, device=y2.device)
        dz = torch.empty(M, N, dtype=z2.dtype, device=z2.device)
        # Enough programs to fill the GPU, each summing its rows' share of dweight.
        programs = max(min(M, 4 * _num_sms(y2.device)), 1)
        rows_per_program = triton.cdiv(M, programs) if M else 1
        programs = triton.cdiv(M, rows_per_program) if M else 1
        dw_partial = torch.zeros(programs, N, dtype=rstd.dtype, device=y2.device)
        block_n = triton.next_power_of_2(N)
        if M:
            _gated_rmsnorm_bwd_kernel[(programs,)](
                y2, z2, weight, rstd, dout2, dy, dz, dw_partial,
                M, N,
                y2.stride(0), z2.stride(0), dout2.stride(0), dy.stride(0), dz.stride(0),
                rows_per_program, BLOCK_N=block_n, ACC=_acc_dtype(y2),
                num_warps=_num_warps(block_n),
            )
        dw = dw_partial.sum(0).to(weight.dtype)
        return dy.reshape(y_shape), dz.reshape(z_shape), dw, None


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * RMSNorm(y * silu(z)) over the last dim, differentiable in y, z and weight.

    y and z (..., N) of one shape, weight (N). The result has dtype promote(weight, y), as the
    module's ``self.weight * h.to(input_dtype)``.
    """
    if y.shape != z.shape or weight.shape != y.shape[-1:]:
        raise ValueError(
            f"gated_rmsnorm shapes disagree: y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}"
        )
    return _GatedRMSNorm.apply(y, z, weight, eps)
