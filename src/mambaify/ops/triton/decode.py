"""Fused one-token decode kernels: the SSD state update and the causal-conv window update.

Both work in place on the generation cache's tensors and allocate nothing when ``out`` is given,
so a decode step built from them can be captured in a CUDA graph. Inputs may be strided views
(e.g. B expanded from the kv heads with stride 0): every tensor is passed with its strides.
Notation as in :mod:`mambaify.ops.reference`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import launch_options, wait_for_inputs


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: fewer, larger blocks are faster
    return torch.cuda.get_device_properties(device).multi_processor_count


def _acc_dtype(t: torch.Tensor) -> tl.dtype:
    # float32 accumulation for everything but float64, which the CPU tests use to compare tightly.
    return tl.float64 if t.dtype == torch.float64 else tl.float32


# --------------------------------------------------------------------------- SSD step


@triton.jit
def softplus_in_dtype(dt, bias, ACC: tl.constexpr):
    """softplus(dt + bias) as PyTorch computes it in dt's dtype: the sum rounded to that dtype,
    the softplus (linear above 20) in ACC, rounded back. The decode kernels then take the same
    dt as the modules' forward (and the verify kernel caches exactly the dt it used)."""
    dtype = dt.dtype
    v = (dt.to(ACC) + bias.to(ACC)).to(dtype).to(ACC)
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0)))).to(dtype)


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, dt_bias_ptr,
    H, N, P, X_REP, B_REP, C_REP,
    s_sb, s_sh, s_sn, s_sp,
    x_sb, x_sh, x_sp,
    dt_sb, dt_sh,
    B_sb, B_sh, B_sn,
    C_sb, C_sh, C_sn,
    y_sb, y_sh, y_sp,
    HAS_D: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (batch b, head h, block of p columns):

        S[b,h] <- exp(dt[b,h] * A[h]) * S[b,h] + B[b,h] (dt[b,h] * x[b,h])^T      (n x p, in place)
        y[b,h]  = S[b,h]^T C[b,h] + D[h] * x[b,h]

    computed in the state's dtype (float32 in the cache). The columns of S are independent, so
    splitting p over programs needs no communication. x, B and C may be given per group of
    heads (X_REP, B_REP, C_REP heads to a group, as repeat_interleave would spread them), and
    with DT_SOFTPLUS dt is the raw projection: dt = softplus(dt + dt_bias[h]) here. Both spare
    the decode step the kernels that would otherwise copy x and B out to every head and apply
    the softplus (three of a Mamba layer's small kernels in session 10's profile).
    """
    wait_for_inputs(PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P

    x = tl.load(x_ptr + b * x_sb + (h // X_REP) * x_sh + offs_p * x_sp, mask=mask_p, other=0.0)
    Bv = tl.load(B_ptr + b * B_sb + (h // B_REP) * B_sh + offs_n * B_sn, mask=mask_n, other=0.0)
    Cv = tl.load(C_ptr + b * C_sb + (h // C_REP) * C_sh + offs_n * C_sn, mask=mask_n, other=0.0)
    S, s_ptrs, mask, dt, a, d = _ssd_loads(state_ptr + b * s_sb + h * s_sh, dt_ptr + b * dt_sb + h * dt_sh,
                                           dt_bias_ptr + h, A_ptr + h, D_ptr + h, offs_n, offs_p, mask_n, mask_p,
                                           s_sn, s_sp, HAS_D, DT_SOFTPLUS)
    _ssd_apply(S, s_ptrs, mask, dt, a, d, x, Bv, Cv, y_ptr + b * y_sb + h * y_sh, offs_p, mask_p, y_sp, HAS_D)


@triton.jit
def _ssd_loads(state, dt_at, dt_bias_at, A_at, D_at, offs_n, offs_p, mask_n, mask_p, s_sn, s_sp,
               HAS_D: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """What a head's recurrence step reads besides x, B and C, in the state's dtype: its (n, p
    block) of state, dt (through the softplus with DT_SOFTPLUS), A and D (zero without HAS_D);
    and the state's pointers and mask for the write-back. Apart from :func:`_ssd_apply` so that
    a kernel can issue these loads before it waits on others."""
    acc = state.dtype.element_ty
    s_ptrs = state + offs_n[:, None] * s_sn + offs_p[None, :] * s_sp
    mask = mask_n[:, None] & mask_p[None, :]
    S = tl.load(s_ptrs, mask=mask, other=0.0)
    dt = tl.load(dt_at)
    if DT_SOFTPLUS:
        dt = softplus_in_dtype(dt, tl.load(dt_bias_at), acc)
    dt = dt.to(acc)
    a = tl.load(A_at).to(acc)
    d = a * 0.0
    if HAS_D:
        d = tl.load(D_at).to(acc)
    return S, s_ptrs, mask, dt, a, d


@triton.jit
def _ssd_apply(S, s_ptrs, mask, dt, a, d, x, Bv, Cv, y_at, offs_p, mask_p, y_sp, HAS_D: tl.constexpr):
    """One head's recurrence step over its (n, p block) of state, written back in place, and its
    y, from what :func:`_ssd_loads` read and the head's x (its p block), B and C."""
    x, Bv, Cv = x.to(S.dtype), Bv.to(S.dtype), Cv.to(S.dtype)
    S = tl.exp(dt * a) * S + Bv[:, None] * (dt * x)[None, :]
    tl.store(s_ptrs, S, mask=mask)
    y = tl.sum(S * Cv[:, None], axis=0)
    if HAS_D:
        y += d * x
    tl.store(y_at + offs_p * y_sp, y.to(y_at.dtype.element_ty), mask=mask_p)


def _block_p(programs_per_block: int, p: int, device: torch.device) -> int:
    # A (b, h) pair alone is too little work to fill the GPU at small batch (b=1, h=32 is 32
    # programs for 132 SMs): split p until there are about two programs per SM.
    block = min(triton.next_power_of_2(p), 64)
    while block > 8 and programs_per_block * triton.cdiv(p, block) < 2 * _num_sms(device):
        block //= 2
    return block


def ssd_step_inplace(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of the SSD recurrence, updating ``state`` (b,h,n,p) in place.

    x (b,g,p), dt (b,h), A (h), B (b,g,n) and C (b,g',n), D (h) or None, where g and g' divide h:
    head i reads group i // (h // g) (x and B from the kv heads without repeating them). dt is
    already softplus-ed, or with ``dt_bias`` (h) the raw projection (softplus(dt + dt_bias)).
    Writes y (b,h,p) into ``out`` (allocated in x's dtype if None) and returns it.
    """
    b, h, n, p = state.shape
    reps = group_sizes(state, x, dt, B, C)
    if out is None:
        out = x.new_empty(b, h, p)
    block_p = _block_p(b * h, p, state.device)
    grid = (b * h, triton.cdiv(p, block_p))
    _ssd_step_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, out, dt_bias if dt_bias is not None else A,
        h, n, p, *reps,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *out.stride(),
        HAS_D=D is not None,
        DT_SOFTPLUS=dt_bias is not None,
        BLOCK_N=triton.next_power_of_2(n),
        BLOCK_P=block_p,
        **launch_options(state.device),
    )
    return out


def group_sizes(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor) -> tuple[int, int, int]:
    """Heads per group of x, B and C for a step over ``state`` (b,h,n,p); a clear error where
    the shapes disagree."""
    b, h, n, p = state.shape
    ok = (x.dim() == 3 and x.shape[0] == b and x.shape[2] == p and dt.shape == (b, h)
          and B.dim() == 3 and B.shape[0] == b and B.shape[2] == n and C.dim() == 3 and C.shape[0] == b
          and C.shape[2] == n and all(t.shape[1] >= 1 and h % t.shape[1] == 0 for t in (x, B, C)))
    if not ok:
        raise ValueError(
            f"ssd_step shapes disagree: state {tuple(state.shape)}, x {tuple(x.shape)}, "
            f"dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} (x, B and C take h heads, or "
            "groups of heads that divide h)"
        )
    return h // x.shape[1], h // B.shape[1], h // C.shape[1]


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mambaify.ops.ssd_step` on the kernel: returns (y, new state), leaving ``state`` as it was."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    new_state = state.to(compute, copy=True)
    return ssd_step_inplace(new_state, x, dt, A, B, C, D), new_state


# --------------------------------------------------------------------------- conv step


@triton.jit
def _conv_step_kernel(
    state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    DIM,
    st_sb, st_sd, st_sk,
    x_sb, x_sd,
    w_sd, w_sk,
    y_sb, y_sd,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (batch b, block of channels d). With the window W = [state[b, d, :], x[b, d]]
    (the K-1 previous inputs, then this one):

        y[b, d]        = silu(bias[d] + sum_k weight[d, k] * W[k])     (silu optional)
        state[b, d, :] = W[1:]                                          (in place)
    """
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < DIM
    row = state_ptr + b * st_sb + offs_d[:, None] * st_sd

    x = tl.load(x_ptr + b * x_sb + offs_d * x_sd, mask=mask_d, other=0.0)
    # The window: taps 0..K-2 from the state, tap K-1 is the new input.
    from_state = mask_d[:, None] & (offs_k < K - 1)[None, :]
    window = tl.load(row + offs_k[None, :] * st_sk, mask=from_state, other=0.0).to(ACC)
    window = tl.where((offs_k == K - 1)[None, :], x.to(ACC)[:, None], window)
    # The next state, W[1:], read now: registers cannot be shifted, and memory may only be
    # overwritten once every load of this block has been issued (barrier below).
    next_in_state = mask_d[:, None] & (offs_k + 1 < K - 1)[None, :]
    shifted = tl.load(row + (offs_k[None, :] + 1) * st_sk, mask=next_in_state, other=0.0)
    shifted = tl.where((offs_k == K - 2)[None, :], x.to(state_ptr.dtype.element_ty)[:, None], shifted)

    w = tl.load(
        w_ptr + offs_d[:, None] * w_sd + offs_k[None, :] * w_sk,
        mask=mask_d[:, None] & (offs_k < K)[None, :],
        other=0.0,
    ).to(ACC)
    y = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * y_sb + offs_d * y_sd, y.to(y_ptr.dtype.element_ty), mask=mask_d)

    # Threads of this program may load a tap that another thread stores to: all loads first.
    tl.debug_barrier()
    tl.store(row + offs_k[None, :] * st_sk, shifted, mask=from_state)


def conv_step_inplace(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of the causal depthwise conv, shifting ``conv_state`` (b,d,K-1) in place.

    x (b,d), weight (d,K), bias (d) or None. Returns y (b,d) = silu(conv) (or the
    pre-activation with ``silu=False``), as :func:`mambaify.ops.causal_conv1d` on one token gives
    it, written into ``out`` (allocated in x's dtype if None).
    """
    b, d = x.shape
    K = weight.shape[-1]
    if conv_state.shape != (b, d, K - 1) or weight.shape != (d, K):
        raise ValueError(
            f"conv_step shapes disagree: conv_state {tuple(conv_state.shape)}, x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if out is None:
        out = torch.empty_like(x)
    block_d = min(triton.next_power_of_2(d), 256)
    _conv_step_kernel[(b, triton.cdiv(d, block_d))](
        conv_state, x, weight, bias if bias is not None else weight, out,
        d,
        *conv_state.stride(),
        *x.stride(),
        *weight.stride(),
        *out.stride(),
        K=K,
        BLOCK_K=max(triton.next_power_of_2(K), 2),
        BLOCK_D=block_d,
        HAS_BIAS=bias is not None,
        APPLY_SILU=silu,
        ACC=_acc_dtype(x),
        **launch_options(x.device),
    )
    return out


# --------------------------------------------------------------------------- conv + SSD step in one


@triton.jit
def _conv_inputs(ch, mask, b, xbc_ptr, cw_ptr, cb_ptr, xbc_sb, xbc_sd, cw_sd, cw_sk,
                 KC: tl.constexpr, WIN: tl.constexpr, HAS_CB: tl.constexpr, ACC: tl.constexpr):
    """What the conv step of channels ``ch`` of row b reads that no slot decides: the new input
    (from xBC), the weights of the window's KC - 1 taps (channels x WIN, WIN a power of two
    >= KC - 1), the new input's weight and the bias (zero without HAS_CB)."""
    new = tl.load(xbc_ptr + b * xbc_sb + ch * xbc_sd, mask=mask, other=0.0)
    taps = tl.arange(0, WIN)
    tap_mask = mask[:, None] & (taps < KC - 1)[None, :]
    w_old = tl.load(cw_ptr + ch[:, None] * cw_sd + taps[None, :] * cw_sk, mask=tap_mask, other=0.0).to(ACC)
    w_new = tl.load(cw_ptr + ch * cw_sd + (KC - 1) * cw_sk, mask=mask, other=0.0).to(ACC)
    bias = w_new * 0.0
    if HAS_CB:
        bias = tl.load(cb_ptr + ch, mask=mask, other=0.0).to(ACC)
    return new, w_old, w_new, bias


@triton.jit
def _conv_window(ch, mask, b, q, win_ptr, w_sq, w_sb, w_sd, w_sk, KC: tl.constexpr, WIN: tl.constexpr):
    """The KC - 1 earlier inputs of channels ``ch`` of row b, from window buffer q (channels x WIN)."""
    taps = tl.arange(0, WIN)
    at = win_ptr + q * w_sq + b * w_sb + ch[:, None] * w_sd + taps[None, :] * w_sk
    return tl.load(at, mask=mask[:, None] & (taps < KC - 1)[None, :], other=0.0)


@triton.jit
def _conv_finish(ch, mask, write, b, q, new, w_old, w_new, bias, old, win_ptr, w_sq, w_sb, w_sd, w_sk,
                 KC: tl.constexpr, WIN: tl.constexpr, ACC: tl.constexpr):
    """silu(causal conv) of channels ``ch`` from what :func:`_conv_inputs` and :func:`_conv_window`
    read, rounded to xBC's dtype as the conv step's output is. Where ``write`` (one program per
    channel), the shifted window goes to buffer q: the other buffer, which no program reads in
    this step, so the programs that share a channel (a group's heads, a head's p blocks) never
    race."""
    acc = new.to(ACC) * w_new + tl.sum(old.to(ACC) * w_old, axis=1) + bias
    taps = tl.arange(0, WIN)
    written = win_ptr + q * w_sq + b * w_sb + ch * w_sd
    write_mask = mask & (tl.zeros_like(ch) + write.to(tl.int32) != 0)
    # Tap j moves to j - 1; the new input becomes the last.
    shifted = write_mask[:, None] & (taps >= 1)[None, :] & (taps < KC - 1)[None, :]
    tl.store(written[:, None] + (taps[None, :] - 1) * w_sk, old, mask=shifted)
    tl.store(written + (KC - 2) * w_sk, new.to(win_ptr.dtype.element_ty), mask=write_mask)
    return (acc * tl.sigmoid(acc)).to(new.dtype)


@triton.jit
def _conv_ssd_step_kernel(
    state_ptr, xbc_ptr, win_ptr, cw_ptr, cb_ptr, slot_ptr, dt_ptr, A_ptr, D_ptr, y_ptr, dt_bias_ptr,
    H, N, P, X_REP, B_REP, C_REP, B_OFF, C_OFF,
    s_sb, s_sh, s_sn, s_sp,
    xbc_sb, xbc_sd,
    w_sq, w_sb, w_sd, w_sk,
    cw_sd, cw_sk,
    dt_sb, dt_sh,
    y_sb, y_sh, y_sp,
    KC: tl.constexpr,
    WIN: tl.constexpr,
    HAS_CB: tl.constexpr,
    HAS_D: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    """The conv step and the SSD step of a Mamba2 layer in one launch. Program (b, h, p block):
    the conv (SiLU-ed) of the x channels of its p block and of the B and C channels of its head's
    groups, from xBC (the raw in_proj slice: x (groups of X_REP heads), then B at B_OFF, C at
    C_OFF) and the conv window, then the recurrence step as in :func:`_ssd_step_kernel`. The
    window lives in two buffers (2, b, channels, KC - 1): the token at slot s reads buffer s % 2
    and leaves the shifted window in the other, each channel written by one program (x by its
    group's first head, B and C by that head's first p block).
    Every load is issued before the first store, the slot's and the state's first. A warp issues
    in order, a store holds it until the value it writes has arrived, and the compiler keeps
    loads behind stores to memory it cannot tell apart: storing each window tap as it was read
    made the program wait on global memory once per tap and group, where it now waits about
    twice."""
    wait_for_inputs(PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    acc = state_ptr.dtype.element_ty
    slot = tl.load(slot_ptr)

    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P
    first_p = pid_p == 0
    S, s_ptrs, mask, dt, a, d = _ssd_loads(state_ptr + b * s_sb + h * s_sh, dt_ptr + b * dt_sb + h * dt_sh,
                                           dt_bias_ptr + h, A_ptr + h, D_ptr + h, offs_n, offs_p, mask_n, mask_p,
                                           s_sn, s_sp, HAS_D, DT_SOFTPLUS)
    ch_x = (h // X_REP) * P + offs_p
    ch_b = B_OFF + (h // B_REP) * N + offs_n
    ch_c = C_OFF + (h // C_REP) * N + offs_n
    x_new, x_w, x_wn, x_bias = _conv_inputs(ch_x, mask_p, b, xbc_ptr, cw_ptr, cb_ptr, xbc_sb, xbc_sd, cw_sd, cw_sk,
                                            KC, WIN, HAS_CB, acc)
    b_new, b_w, b_wn, b_bias = _conv_inputs(ch_b, mask_n, b, xbc_ptr, cw_ptr, cb_ptr, xbc_sb, xbc_sd, cw_sd, cw_sk,
                                            KC, WIN, HAS_CB, acc)
    c_new, c_w, c_wn, c_bias = _conv_inputs(ch_c, mask_n, b, xbc_ptr, cw_ptr, cb_ptr, xbc_sb, xbc_sd, cw_sd, cw_sk,
                                            KC, WIN, HAS_CB, acc)
    read_q = slot % 2
    write_q = 1 - read_q
    x_old = _conv_window(ch_x, mask_p, b, read_q, win_ptr, w_sq, w_sb, w_sd, w_sk, KC, WIN)
    b_old = _conv_window(ch_b, mask_n, b, read_q, win_ptr, w_sq, w_sb, w_sd, w_sk, KC, WIN)
    c_old = _conv_window(ch_c, mask_n, b, read_q, win_ptr, w_sq, w_sb, w_sd, w_sk, KC, WIN)

    x = _conv_finish(ch_x, mask_p, h % X_REP == 0, b, write_q, x_new, x_w, x_wn, x_bias, x_old, win_ptr, w_sq, w_sb,
                     w_sd, w_sk, KC, WIN, acc)
    Bv = _conv_finish(ch_b, mask_n, (h % B_REP == 0) & first_p, b, write_q, b_new, b_w, b_wn, b_bias, b_old, win_ptr,
                      w_sq, w_sb, w_sd, w_sk, KC, WIN, acc)
    Cv = _conv_finish(ch_c, mask_n, (h % C_REP == 0) & first_p, b, write_q, c_new, c_w, c_wn, c_bias, c_old, win_ptr,
                      w_sq, w_sb, w_sd, w_sk, KC, WIN, acc)
    _ssd_apply(S, s_ptrs, mask, dt, a, d, x, Bv, Cv, y_ptr + b * y_sb + h * y_sh, offs_p, mask_p, y_sp, HAS_D)


def conv_ssd_step_inplace(
    state: torch.Tensor,
    windows: torch.Tensor,
    slot: torch.Tensor,
    xBC: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    groups: tuple[int, int, int],
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The conv step and the SSD step of one decode token in one launch (see
    :func:`mambaify.ops.conv_ssd_step_inplace` for the arguments); returns y (b, h, p)."""
    b, h, n, p = state.shape
    gx, gb, gc = groups
    d = xBC.shape[-1]
    K = conv_weight.shape[-1]
    if (xBC.shape != (b, d) or d != gx * p + (gb + gc) * n or windows.shape != (2, b, d, K - 1) or K < 2
            or conv_weight.shape != (d, K) or dt.shape != (b, h) or any(h % g for g in groups) or slot.numel() != 1):
        raise ValueError(
            f"conv_ssd_step shapes disagree: state {tuple(state.shape)}, windows {tuple(windows.shape)}, "
            f"xBC {tuple(xBC.shape)}, conv_weight {tuple(conv_weight.shape)}, groups {groups}, dt {tuple(dt.shape)}"
        )
    if out is None:
        out = xBC.new_empty(b, h, p)
    block_p = _block_p(b * h, p, state.device)
    _conv_ssd_step_kernel[(b * h, triton.cdiv(p, block_p))](
        state, xBC, windows, conv_weight, conv_bias if conv_bias is not None else conv_weight, slot, dt, A,
        D if D is not None else A, out, dt_bias if dt_bias is not None else A,
        h, n, p, h // gx, h // gb, h // gc, gx * p, gx * p + gb * n,
        *state.stride(),
        *xBC.stride(),
        *windows.stride(),
        *conv_weight.stride(),
        *dt.stride(),
        *out.stride(),
        KC=K,
        WIN=triton.next_power_of_2(K - 1),
        HAS_CB=conv_bias is not None,
        HAS_D=D is not None,
        DT_SOFTPLUS=dt_bias is not None,
        BLOCK_N=triton.next_power_of_2(n),
        BLOCK_P=block_p,
        **launch_options(state.device),
    )
    return out
