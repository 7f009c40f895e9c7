"""One interface to the Mamba2 scan, with the backend chosen per device.

Models call :func:`ssd_scan`, :func:`ssd_step` and :func:`causal_conv1d` and never a backend
directly. The plain PyTorch functions in :mod:`mambaify.ops.reference` define the results and
serve the CPU; GPU kernels register themselves here under a name with :func:`register_backend`
and are picked for CUDA tensors when available. ``MAMBAIFY_SSD_BACKEND`` (or the ``backend``
argument) forces a choice, e.g. to compare two backends in a test.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from . import reference
from .reference import (
    causal_conv1d,
    check_counts,
    check_verify_shapes,
    conv_verify,
    rms_norm,
    segsum,
    ssd_chunked,
    ssd_fold,
    ssd_sequential,
    ssd_step,
    ssd_verify,
)


class SSDScan(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
        chunk_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _sequential(x, dt, A, B, C, D=None, initial_state=None, reset=None, chunk_size=64):
    return ssd_sequential(x, dt, A, B, C, D, initial_state, reset)


_BACKENDS: dict[str, SSDScan] = {"chunked": ssd_chunked, "sequential": _sequential}
# Backends that may serve CUDA tensors, most preferred first; filled by GPU modules that import.
_CUDA_PREFERENCE: list[str] = []


def register_backend(name: str, fn: SSDScan, cuda_preferred: bool = False) -> None:
    """Make a scan implementation selectable by name (and preferred on CUDA if asked)."""
    _BACKENDS[name] = fn
    if cuda_preferred and name not in _CUDA_PREFERENCE:
        _CUDA_PREFERENCE.insert(0, name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _load_gpu_backends() -> None:
    # GPU kernels live in an optional module; importing it registers what the machine supports.
    try:
        from . import triton as _gpu  # noqa: F401
    except ImportError:
        pass


def select_backend(device: torch.device, backend: str | None = None) -> str:
    name = backend or os.environ.get("MAMBAIFY_SSD_BACKEND") or "auto"
    if name != "auto":
        if name not in _BACKENDS and device.type == "cuda":
            _load_gpu_backends()
        if name not in _BACKENDS:
            raise ValueError(
                f"unknown SSD backend {name!r}; available: {', '.join(available_backends())}"
            )
        return name
    if device.type == "cuda":
        _load_gpu_backends()
        if _CUDA_PREFERENCE:
            return _CUDA_PREFERENCE[0]
    return "chunked"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the SSD scan over a sequence; see :mod:`mambaify.ops.reference` for the definition."""
    if x.shape[1] == 1 and backend is None:
        # One token (transformers' generate decoding through forward): a single recurrence step.
        # No chunk to pad out, and on CUDA no chunked scan kernel for a call it is not made for:
        # fla would compile and autotune kernels only this path uses, and a bf16 hybrid generating
        # this way on the H200 produced text its own forward found improbable (BENCHMARKS.md).
        return ssd_sequential(x, dt, A, B, C, D, initial_state, reset)
    fn: Callable = _BACKENDS[select_backend(x.device, backend)]
    return fn(x, dt, A, B, C, D, initial_state, reset, chunk_size)


# --- Fused decode / norm kernels: Triton on CUDA tensors, PyTorch elsewhere --------------------
# One function each for the generation engine; the PyTorch forms compute the same in the
# reference's terms and serve the CPU (and CUDA when Triton is missing).
#
# Under torch.compile each of them is one opaque custom op (``torch.ops.mambaify.*``, defined
# below), so that the engine's compiled decode step neither traces into the Triton launchers
# (which would break the graph) nor re-derives the kernels: the op's body is the same dispatch
# as the eager call. Eagerly the functions run directly and cost no custom-op dispatch.


def _gpu_kernels(t: torch.Tensor):
    """mambaify.ops.triton for a CUDA tensor where Triton imports, else None."""
    return _gpu_kernels_import() if t.device.type == "cuda" else None


def _gpu_kernels_import():
    try:
        from . import triton as kernels
    except ImportError:
        return None
    return kernels


def gpu_kernels_available(device: torch.device) -> bool:
    """Whether mambaify's Triton kernels serve tensors on ``device`` (CUDA, Triton importable)."""
    return device.type == "cuda" and _gpu_kernels_import() is not None


def pdl_requested() -> bool:
    """MAMBAIFY_PDL=1 asks for programmatic dependent launch (PDL, Hopper on) in the compiled
    decode step and rounds: inductor's kernels (its ``triton.enable_pdl``) and the split-K GEMV
    launch before the kernel ahead of them has finished, the GEMV streaming its first weight
    tiles meanwhile. Off by default: on the H200 (session 11) it made the compiled 8B step
    slower, 4.87 against 4.74 ms for the teacher and 5.21 against 4.99 ms for the 0% hybrid."""
    return os.environ.get("MAMBAIFY_PDL", "0") == "1"


def pdl_enabled(device: torch.device | None = None) -> bool:
    """Whether kernels on ``device`` (None: the current CUDA device) launch as programmatic
    dependent launches: asked for (:func:`pdl_requested`) and a GPU that has it (Hopper on)."""
    if not pdl_requested() or (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def qkv_read_as_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`small_batch_qkv`'s kernel can read three projection weights as one matrix:
    each a contiguous (N, K) matrix, of one K and one dtype."""
    return all(w.dim() == 2 and w.shape[1] == q.shape[1] and w.dtype == q.dtype and w.stride() == (w.shape[1], 1)
               for w in (q, k, v))


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
    """:func:`ssd_step` updating ``state`` (b,h,n,p) in place; y (b,h,p) goes to ``out`` if given.
    On CUDA one fused kernel that allocates nothing when ``out`` is given (CUDA-graph safe).
    x and B (and C) may hold groups of heads that divide h (head i reads group i // (h // g), as
    ``repeat_interleave`` would spread them); with ``dt_bias`` (h), dt is the raw projection and
    the step takes softplus(dt + dt_bias), computed as PyTorch does in dt's dtype."""
    if torch.compiler.is_compiling():
        out = x.new_empty(state.shape[0], state.shape[1], state.shape[3]) if out is None else out
        torch.ops.mambaify.ssd_step_inplace(state, x, dt, A, B, C, D, out, dt_bias)
        return out
    return _ssd_step_inplace(state, x, dt, A, B, C, D, out, dt_bias)


def _per_head(heads: int, x, B, C, dt, dt_bias):
    """The PyTorch paths' inputs as the kernels read them: x, B and C given per group of heads
    (dimension -2) spread to every head, and with ``dt_bias`` dt as softplus(dt + dt_bias) in
    dt's dtype."""
    x, B, C = (v.repeat_interleave(heads // v.shape[-2], dim=-2) if 0 < v.shape[-2] < heads else v for v in (x, B, C))
    if dt_bias is not None:
        dt = F.softplus(dt + dt_bias.to(dt.dtype))
    return x, B, C, dt


def _ssd_step_inplace(state, x, dt, A, B, C, D=None, out=None, dt_bias=None):
    kernels = _gpu_kernels(state)
    if kernels is not None:
        return kernels.ssd_step_inplace(state, x, dt, A, B, C, D, out, dt_bias)
    x, B, C, dt = _per_head(state.shape[1], x, B, C, dt, dt_bias)
    y, new_state = ssd_step(state, x, dt, A, B, C, D)
    state.copy_(new_state)
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)


def conv_step_inplace(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`causal_conv1d` for one token x (b,d), then SiLU (unless ``silu=False``), shifting
    ``conv_state`` (b,d,K-1) in place; the output goes to ``out`` if given."""
    if torch.compiler.is_compiling():
        out = torch.empty_like(x) if out is None else out
        torch.ops.mambaify.conv_step_inplace(conv_state, x, weight, bias, silu, out)
        return out
    return _conv_step_inplace(conv_state, x, weight, bias, silu, out)


def _conv_step(window, x, weight, bias, silu):
    """The PyTorch conv step: (output (b, d), the shifted window (b, d, K-1))."""
    y, new_window = causal_conv1d(x[:, None], weight, bias, window)
    return (torch.nn.functional.silu(y[:, 0]) if silu else y[:, 0]), new_window


def _conv_step_inplace(conv_state, x, weight, bias=None, silu=True, out=None):
    kernels = _gpu_kernels(conv_state)
    if kernels is not None:
        return kernels.conv_step_inplace(conv_state, x, weight, bias, silu, out)
    y, new_state = _conv_step(conv_state, x, weight, bias, silu)
    conv_state.copy_(new_state)
    return y if out is None else out.copy_(y)


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
    """A Mamba2 decode token's conv step and SSD step together (one kernel on CUDA):
    :func:`conv_step_inplace` of the raw conv input xBC (b, d) with SiLU, split into x (gx groups
    of p), B (gb groups of n) and C (gc groups of n), then :func:`ssd_step_inplace` on ``state``
    (b, h, n, p) with dt (b, h) raw when ``dt_bias`` is given. ``groups`` = (gx, gb, gc), each
    dividing h. The conv window is double-buffered: ``windows`` (2, b, d, K-1) holds it in
    buffer ``slot % 2`` (slot: a one-element tensor, the token's cache slot) and the step leaves
    the shifted window in the other buffer, which is what lets one kernel's programs share the
    channels they read. y (b, h, p) goes to ``out`` if given."""
    groups = tuple(int(g) for g in groups)
    if torch.compiler.is_compiling():
        out = xBC.new_empty(state.shape[0], state.shape[1], state.shape[3]) if out is None else out
        torch.ops.mambaify.conv_ssd_step_inplace(state, windows, slot, xBC, conv_weight, conv_bias, list(groups), dt,
                                                 A, D, dt_bias, out)
        return out
    return _conv_ssd_step_inplace(state, windows, slot, xBC, conv_weight, conv_bias, groups, dt, A, D, dt_bias, out)


def _conv_ssd_step_inplace(state, windows, slot, xBC, conv_weight, conv_bias, groups, dt, A, D=None, dt_bias=None,
                           out=None):
    kernels = _gpu_kernels(state)
    if kernels is not None:
        return kernels.conv_ssd_step_inplace(state, windows, slot, xBC, conv_weight, conv_bias, groups, dt, A, D,
                                             dt_bias, out)
    parity = slot.reshape(1) % 2
    activated, window = _conv_step(windows.index_select(0, parity)[0], xBC, conv_weight, conv_bias, silu=True)
    windows.index_copy_(0, 1 - parity, window[None])
    (gx, gb, gc), n, p = groups, state.shape[2], state.shape[3]
    x, B, C = activated.split([gx * p, gb * n, gc * n], dim=-1)
    return _ssd_step_inplace(state, x.unflatten(-1, (gx, p)), dt, A, B.unflatten(-1, (gb, n)),
                             C.unflatten(-1, (gc, n)), D, out, dt_bias)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * RMSNorm(y * silu(z)) over the last dim, as ``models.modeling.GatedRMSNorm``
    computes it (differentiable on both paths)."""
    if torch.compiler.is_compiling():
        # Inference: one opaque op (the Triton kernel on CUDA). Training (a compiled training
        # step): the PyTorch form, which inductor fuses, backward included.
        if not _needs_grad(y, z, weight):
            return torch.ops.mambaify.gated_rmsnorm(y, z, weight, eps)
        return reference.gated_rms_norm(y, z, weight, eps)
    return _gated_rmsnorm(y, z, weight, eps)


def _gated_rmsnorm(y, z, weight, eps=1e-6):
    kernels = _gpu_kernels(y)
    if kernels is not None:
        return kernels.gated_rmsnorm(y, z, weight, eps)
    return reference.gated_rms_norm(y, z, weight, eps)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# The custom ops. Each body is the eager dispatch above (Triton on CUDA tensors, PyTorch
# elsewhere); the fake (meta) functions tell the compiler the shapes: the two step ops write
# into their state and ``out`` and return nothing, the norm returns a new tensor. The norm op
# has no backward: gated_rmsnorm uses it only where no gradient is wanted (inference).


@torch.library.custom_op("mambaify::ssd_step_inplace", mutates_args=("state", "out"))
def _ssd_step_op(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    out: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
) -> None:
    _ssd_step_inplace(state, x, dt, A, B, C, D, out, dt_bias)


@_ssd_step_op.register_fake
def _(state, x, dt, A, B, C, D, out, dt_bias=None) -> None:
    return None


@torch.library.custom_op("mambaify::conv_ssd_step_inplace", mutates_args=("state", "windows", "out"))
def _conv_ssd_step_op(
    state: torch.Tensor,
    windows: torch.Tensor,
    slot: torch.Tensor,
    xBC: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    groups: list[int],
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    _conv_ssd_step_inplace(state, windows, slot, xBC, conv_weight, conv_bias, tuple(groups), dt, A, D, dt_bias, out)


@_conv_ssd_step_op.register_fake
def _(state, windows, slot, xBC, conv_weight, conv_bias, groups, dt, A, D, dt_bias, out) -> None:
    return None


@torch.library.custom_op("mambaify::conv_step_inplace", mutates_args=("conv_state", "out"))
def _conv_step_op(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    out: torch.Tensor,
) -> None:
    _conv_step_inplace(conv_state, x, weight, bias, silu, out)


@_conv_step_op.register_fake
def _(conv_state, x, weight, bias, silu, out) -> None:
    return None


@torch.library.custom_op("mambaify::gated_rmsnorm", mutates_args=())
def _gated_rmsnorm_op(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _gated_rmsnorm(y, z, weight, eps)


@_gated_rmsnorm_op.register_fake
def _(y, z, weight, eps):
    return y.new_empty(y.shape, dtype=torch.promote_types(weight.dtype, y.dtype))


# The small-batch linear layers below take two optional fused operands: ``norm_weight`` /
# ``norm_eps``, an RMSNorm of the Llama family (reference.rms_norm) applied to x first (with
# ``gate``, Mamba2's gated RMSNorm of x * silu(gate) instead, reference.gated_rms_norm), and
# ``residual``, added to the result. On CUDA the GEMV folds both into its launch (the norm's
# scale factors out of the product); elsewhere PyTorch computes them as the modules would.

# The most rows for which callers should hand the GEMV a norm to fold in. The residual add folds
# well at any row count, the norm only at one row: with several rows (tl.dot, padded to 16) every
# n block's programs redo the norm's work on the whole padded x tile, in registers the dot already
# fills. Measured on the H200 at 4 rows (a verify call; bench_kernels.py --only gemv-fused,
# session 13, the same launch configuration): the norm folded made q+k+v 53 against 18 us with
# the norm as its own kernel, gate and up as one matrix 189 against 61, Mamba's out_proj with its
# gated norm 87 against 17; at one row, folded was faster for every matrix (gate and up as one
# 61 against 69 us, q+k+v 16.7 against 17.7).
FOLD_NORM_MAX_ROWS = 1


def folds_norm(x: torch.Tensor) -> bool:
    """Whether a norm over x (..., K) is best folded into the small-batch linear layer after it
    (:data:`FOLD_NORM_MAX_ROWS`) rather than run as its own kernel first."""
    return x.numel() <= FOLD_NORM_MAX_ROWS * x.shape[-1]


# The most rows the small-batch linear layers run as the split-K GEMV on CUDA; beyond, a matrix
# product (F.linear, cuBLAS) is the right call.
SMALL_BATCH_MAX_ROWS = 16


def prepares_norm(x: torch.Tensor) -> bool:
    """Whether the GEMV that writes x (..., K), a residual stream, is best asked to prepare the
    norm over x (:func:`small_batch_linear_prepare_norm`): where the GEMV after the norm would
    not fold it (several rows) and the GEMV runs at all (at most SMALL_BATCH_MAX_ROWS rows)."""
    return not folds_norm(x) and x.numel() <= SMALL_BATCH_MAX_ROWS * x.shape[-1]


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                       residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                       norm_parts: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``[residual +] F.linear([rms_norm](x), weight, bias)``; on CUDA, for at most 16 rows, the
    split-K Triton GEMV (:func:`mambaify.ops.triton.gemv.small_batch_linear`). Inference only
    (no backward): the engines' decode steps and rounds use it on CUDA by default
    (``Engine(small_batch_linear="auto")``). ``norm_parts``: a prepared norm
    (:func:`small_batch_linear_prepare_norm`), x already times the norm's weight. ``weight_scale``
    (N,): the weight is int8 with these row scales (a quantized draft's,
    :func:`mambaify.generate.quantize.quantize_int8`)."""
    if torch.compiler.is_compiling():
        return torch.ops.mambaify.small_batch_linear(x, weight, bias, norm_weight, norm_eps, residual, gate,
                                                     norm_parts, weight_scale)
    return _small_batch_linear(x, weight, bias, norm_weight, norm_eps, residual, gate, norm_parts, weight_scale)


def _small_batch_linear(x, weight, bias=None, norm_weight=None, norm_eps=1e-6, residual=None, gate=None,
                        norm_parts=None, weight_scale=None):
    kernels = _gpu_kernels(x)
    if kernels is not None:
        return kernels.small_batch_linear(x, weight, bias, norm_weight=norm_weight, norm_eps=norm_eps,
                                          residual=residual, gate=gate, norm_parts=norm_parts,
                                          weight_scale=weight_scale)
    return reference.small_batch_linear(x, weight, bias, norm_weight, norm_eps, residual, gate, norm_parts,
                                        weight_scale)


def small_batch_linear_prepare_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    residual: torch.Tensor, next_norm_weight: torch.Tensor,
                                    weight_scale: torch.Tensor | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual stream h = residual + ``F.linear(x, weight, bias)`` with the inputs of the
    RMSNorm after it prepared: (h, h times ``next_norm_weight``, each row's sums of squares of h
    by blocks of columns, (blocks, rows)), for the small-batch linear layers after the norm
    (``norm_parts``), which then run none of the norm's work. On CUDA, for at most 16 rows, in
    the split-K GEMV's launch (:func:`mambaify.ops.triton.gemv.small_batch_linear_prepare_norm`).
    ``weight_scale``: as for :func:`small_batch_linear`."""
    if torch.compiler.is_compiling():
        return torch.ops.mambaify.small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight,
                                                                  weight_scale)
    return _small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight, weight_scale)


def _small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight, weight_scale=None):
    kernels = _gpu_kernels(x)
    if kernels is not None:
        return kernels.small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight,
                                                       weight_scale=weight_scale)
    return reference.small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight, weight_scale)


def small_batch_gated_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                         norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                         norm_parts: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
                         up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(F.linear(x, gate)) * F.linear(x, up)`` of ``[rms_norm](x)``, a SwiGLU MLP's first
    half; on CUDA, for at most 16 rows, one pass of the split-K GEMV over both matrices with the
    gate applied as the sums finish (:func:`mambaify.ops.triton.gemv.small_batch_gated_up`).
    Inference only. ``norm_parts``: as for :func:`small_batch_linear`; ``gate_scale``,
    ``up_scale``: both matrices int8, these their row scales."""
    if torch.compiler.is_compiling():
        return torch.ops.mambaify.small_batch_gated_up(x, gate, up, norm_weight, norm_eps, norm_parts, gate_scale,
                                                       up_scale)
    return _small_batch_gated_up(x, gate, up, norm_weight, norm_eps, norm_parts, gate_scale, up_scale)


def _small_batch_gated_up(x, gate, up, norm_weight=None, norm_eps=1e-6, norm_parts=None, gate_scale=None,
                          up_scale=None):
    kernels = _gpu_kernels(x)
    if kernels is not None:
        return kernels.small_batch_gated_up(x, gate, up, norm_weight=norm_weight, norm_eps=norm_eps,
                                            norm_parts=norm_parts, gate_scale=gate_scale, up_scale=up_scale)
    return reference.small_batch_gated_up(x, gate, up, norm_weight, norm_eps, norm_parts, gate_scale, up_scale)


def small_batch_qkv(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None, v_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, norm_parts: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """An attention layer's three projections side by side, ``cat([F.linear(x, q, q_bias),
    F.linear(x, k, k_bias), F.linear(x, v, v_bias)], -1)`` of ``[rms_norm](x)``; on CUDA, for at
    most 16 rows, one launch of the split-K GEMV over the three matrices
    (:func:`mambaify.ops.triton.gemv.small_batch_qkv`). Inference only. ``norm_parts``: as for
    :func:`small_batch_linear`; ``weight_scale``: the three int8, their row scales side by side."""
    if torch.compiler.is_compiling():
        return torch.ops.mambaify.small_batch_qkv(x, q, k, v, q_bias, k_bias, v_bias, norm_weight, norm_eps,
                                                  norm_parts, weight_scale)
    return _small_batch_qkv(x, q, k, v, q_bias, k_bias, v_bias, norm_weight, norm_eps, norm_parts, weight_scale)


def _small_batch_qkv(x, q, k, v, q_bias=None, k_bias=None, v_bias=None, norm_weight=None, norm_eps=1e-6,
                     norm_parts=None, weight_scale=None):
    kernels = _gpu_kernels(x)
    if kernels is not None:
        return kernels.small_batch_qkv(x, q, k, v, q_bias, k_bias, v_bias, norm_weight=norm_weight,
                                       norm_eps=norm_eps, norm_parts=norm_parts, weight_scale=weight_scale)
    return reference.small_batch_qkv(x, q, k, v, q_bias, k_bias, v_bias, norm_weight, norm_eps, norm_parts,
                                     weight_scale)


@torch.library.custom_op("mambaify::small_batch_qkv", mutates_args=())
def _small_batch_qkv_op(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
                        v_bias: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6, norm_parts: torch.Tensor | None = None,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _small_batch_qkv(x, q, k, v, q_bias, k_bias, v_bias, norm_weight, norm_eps, norm_parts, weight_scale)


@_small_batch_qkv_op.register_fake
def _(x, q, k, v, q_bias, k_bias, v_bias, norm_weight=None, norm_eps=1e-6, norm_parts=None, weight_scale=None):
    return x.new_empty((*x.shape[:-1], q.shape[0] + k.shape[0] + v.shape[0]))


@torch.library.custom_op("mambaify::small_batch_gated_up", mutates_args=())
def _small_batch_gated_up_op(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                             norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                             norm_parts: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
                             up_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _small_batch_gated_up(x, gate, up, norm_weight, norm_eps, norm_parts, gate_scale, up_scale)


@_small_batch_gated_up_op.register_fake
def _(x, gate, up, norm_weight=None, norm_eps=1e-6, norm_parts=None, gate_scale=None, up_scale=None):
    return x.new_empty((*x.shape[:-1], gate.shape[0]))


@torch.library.custom_op("mambaify::small_batch_linear", mutates_args=())
def _small_batch_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                           residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                           norm_parts: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
                           ) -> torch.Tensor:
    return _small_batch_linear(x, weight, bias, norm_weight, norm_eps, residual, gate, norm_parts, weight_scale)


@_small_batch_linear_op.register_fake
def _(x, weight, bias, norm_weight=None, norm_eps=1e-6, residual=None, gate=None, norm_parts=None, weight_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("mambaify::small_batch_linear_prepare_norm", mutates_args=())
def _small_batch_linear_prepare_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                        residual: torch.Tensor, next_norm_weight: torch.Tensor,
                                        weight_scale: torch.Tensor | None = None
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _small_batch_linear_prepare_norm(x, weight, bias, residual, next_norm_weight, weight_scale)


@_small_batch_linear_prepare_norm_op.register_fake
def _(x, weight, bias, residual, next_norm_weight, weight_scale=None):
    n, k = weight.shape
    rows = x.numel() // k
    kernels = _gpu_kernels(x)
    # As many blocks as the call will leave: the kernel's (CUDA, at most 16 rows), else one.
    in_kernel = kernels is not None and 0 < rows <= SMALL_BATCH_MAX_ROWS
    blocks = kernels.gemv.prepared_blocks(rows, n, k, x.device) if in_kernel else 1
    out = x.new_empty((*x.shape[:-1], n))
    parts = x.new_empty((blocks, rows), dtype=torch.promote_types(x.dtype, torch.float32))
    return out, torch.empty_like(out), parts


# --- Speculative verify (PAPER.md section 3): one call per Mamba layer and verify round ------


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
    dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ssd_verify` in place: fold the first counts[b] cached tokens into ``checkpoint``
    (b,h,n,p), run the new tokens x (b,t,h,p), dt (b,t,h), B, C (b,t,h,n) from there, then
    store x, dt, B into positions 0..t-1 of x_cache (b,T,h,p), dt_cache (b,T,h), B_cache
    (b,T,h,n) (T >= t). Returns y (b,t,h,p), in ``out`` if given.

    As for :func:`ssd_step_inplace`, x, B and C may hold groups of heads that divide h (the
    caches still hold every head), and with ``dt_bias`` (h) dt is the raw projection: the call
    takes softplus(dt + dt_bias) in dt's dtype, and caches that.

    On CUDA one fused kernel that writes no per-token state and allocates nothing when ``out``
    is given (CUDA-graph safe after a warm-up call). counts (b,) must lie in [0, T]; it is
    checked except while a CUDA graph is captured (``check_counts_values``: see
    :func:`reference.check_counts`).
    """
    if torch.compiler.is_compiling():
        out = x.new_empty(*x.shape[:2], checkpoint.shape[1], x.shape[3]) if out is None else out
        torch.ops.mambaify.ssd_verify_inplace(
            checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out, check_counts_values, dt_bias
        )
        return out
    return _ssd_verify_inplace(
        checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out, check_counts_values, dt_bias
    )


def _ssd_verify_inplace(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D=None, out=None,
                        check_counts_values=None, dt_bias=None):
    kernels = _gpu_kernels(checkpoint)
    if kernels is not None:
        return kernels.ssd_verify_inplace(
            checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out,
            check_counts_values=check_counts_values, dt_bias=dt_bias,
        )
    T, t = check_verify_shapes(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, B, C)
    check_counts(counts, T, check_counts_values)
    x, B, C, dt = _per_head(checkpoint.shape[1], x, B, C, dt, dt_bias)
    folded = ssd_fold(checkpoint, x_cache, dt_cache, B_cache, counts, A)
    y, _ = ssd_sequential(x, dt, A, B, C, D, initial_state=folded)
    checkpoint.copy_(folded)
    # Only after the fold: the caches hold the inputs it replays.
    x_cache[:, :t].copy_(x)
    dt_cache[:, :t].copy_(dt)
    B_cache[:, :t].copy_(B)
    return y if out is None else out.copy_(y)


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
) -> torch.Tensor:
    """The naive verify call that :func:`ssd_verify_inplace` is benchmarked against: every
    per-token state is written to states (b,T,h,n,p), and the next call starts from the accepted
    one, states[b, counts[b]-1] (``checkpoint`` when counts[b] = 0), by a gather instead of a
    replay; that start is saved into ``checkpoint``. Same y and checkpoint as the fused call."""
    if torch.compiler.is_compiling():
        out = torch.empty_like(x) if out is None else out
        torch.ops.mambaify.ssd_verify_store_states(
            checkpoint, states, counts, x, dt, A, B, C, D, out, check_counts_values
        )
        return out
    return _ssd_verify_store_states(checkpoint, states, counts, x, dt, A, B, C, D, out, check_counts_values)


def _ssd_verify_store_states(checkpoint, states, counts, x, dt, A, B, C, D=None, out=None, check_counts_values=None):
    kernels = _gpu_kernels(checkpoint)
    if kernels is not None:
        return kernels.ssd_verify_store_states(
            checkpoint, states, counts, x, dt, A, B, C, D, out, check_counts_values=check_counts_values
        )
    t = x.shape[1]
    if states.dim() != 5 or t > states.shape[1]:
        raise ValueError(f"ssd_verify_store_states: states {tuple(states.shape)} must be (b,T,h,n,p) with T >= t = {t}")
    check_counts(counts, states.shape[1], check_counts_values, what="ssd_verify_store_states")
    rows = torch.arange(states.shape[0], device=states.device)
    gathered = states[rows, (counts.long() - 1).clamp(min=0)]
    state = torch.where((counts > 0).view(-1, 1, 1, 1), gathered, checkpoint)
    checkpoint.copy_(state)
    ys = []
    for i in range(t):
        y_i, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        states[:, i].copy_(state)
        ys.append(y_i)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y if out is None else out.copy_(y)


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
    """:func:`conv_verify` in place: slide row b of ``window`` (b, d_conv-1+T, c) by counts[b],
    return the conv of xBC (b,t,c) over that history (pre-activation, with bias; SiLU-ed if
    ``silu``), and leave window = [history, xBC, rows after untouched]. On CUDA one kernel."""
    if torch.compiler.is_compiling():
        out = torch.empty_like(xBC) if out is None else out
        torch.ops.mambaify.conv_verify_inplace(window, counts, xBC, weight, bias, out, silu, check_counts_values)
        return out
    return _conv_verify_inplace(window, counts, xBC, weight, bias, out, silu, check_counts_values)


def _conv_verify_inplace(window, counts, xBC, weight, bias=None, out=None, silu=False, check_counts_values=None):
    kernels = _gpu_kernels(window)
    if kernels is not None:
        return kernels.conv_verify_inplace(
            window, counts, xBC, weight, bias, out, silu=silu, check_counts_values=check_counts_values
        )
    d_conv = weight.shape[-1]
    T = window.shape[1] - (d_conv - 1)
    check_counts(counts, T, check_counts_values, what="conv_verify_inplace")
    y, history = conv_verify(window, counts, xBC, weight, bias)
    t = xBC.shape[1]
    window[:, : d_conv - 1].copy_(history)
    window[:, d_conv - 1 : d_conv - 1 + t].copy_(xBC)
    if silu:
        y = torch.nn.functional.silu(y)
    return y if out is None else out.copy_(y)


# The verify calls as custom ops, as the decode ones above: the speculative engine's compiled
# rounds would otherwise trace into the Triton launchers on CUDA, and on the CPU into the count
# check, whose host read of ``counts`` breaks the graph. The body is the eager call, count check
# included: it still skips itself while a CUDA graph is captured.


@torch.library.custom_op(
    "mambaify::ssd_verify_inplace", mutates_args=("checkpoint", "x_cache", "dt_cache", "B_cache", "out")
)
def _ssd_verify_op(
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
    D: torch.Tensor | None,
    out: torch.Tensor,
    check_counts_values: bool | None,
    dt_bias: torch.Tensor | None = None,
) -> None:
    _ssd_verify_inplace(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out, check_counts_values,
                        dt_bias)


@_ssd_verify_op.register_fake
def _(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out, check_counts_values, dt_bias=None) -> None:
    # Shapes are known while tracing: a mismatch fails the compile with the eager call's message.
    check_verify_shapes(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, B, C)


@torch.library.custom_op("mambaify::ssd_verify_store_states", mutates_args=("checkpoint", "states", "out"))
def _ssd_verify_store_states_op(
    checkpoint: torch.Tensor,
    states: torch.Tensor,
    counts: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    out: torch.Tensor,
    check_counts_values: bool | None,
) -> None:
    _ssd_verify_store_states(checkpoint, states, counts, x, dt, A, B, C, D, out, check_counts_values)


@_ssd_verify_store_states_op.register_fake
def _(checkpoint, states, counts, x, dt, A, B, C, D, out, check_counts_values) -> None:
    return None


@torch.library.custom_op("mambaify::conv_verify_inplace", mutates_args=("window", "out"))
def _conv_verify_op(
    window: torch.Tensor,
    counts: torch.Tensor,
    xBC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    silu: bool,
    check_counts_values: bool | None,
) -> None:
    _conv_verify_inplace(window, counts, xBC, weight, bias, out, silu, check_counts_values)


@_conv_verify_op.register_fake
def _(window, counts, xBC, weight, bias, out, silu, check_counts_values) -> None:
    return None


__all__ = [
    "FOLD_NORM_MAX_ROWS",
    "SMALL_BATCH_MAX_ROWS",
    "SSDScan",
    "available_backends",
    "causal_conv1d",
    "conv_ssd_step_inplace",
    "conv_step_inplace",
    "conv_verify",
    "conv_verify_inplace",
    "folds_norm",
    "prepares_norm",
    "gated_rmsnorm",
    "gpu_kernels_available",
    "pdl_enabled",
    "pdl_requested",
    "qkv_read_as_one",
    "reference",
    "register_backend",
    "rms_norm",
    "segsum",
    "select_backend",
    "small_batch_gated_up",
    "small_batch_linear",
    "small_batch_linear_prepare_norm",
    "small_batch_qkv",
    "ssd_chunked",
    "ssd_scan",
    "ssd_sequential",
    "ssd_step",
    "ssd_step_inplace",
    "ssd_verify",
    "ssd_verify_inplace",
    "ssd_verify_store_states",
]
