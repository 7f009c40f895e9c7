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

from . import reference
from .reference import causal_conv1d, segsum, ssd_chunked, ssd_sequential, ssd_step


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
    if x.shape[1] == 1 and backend is None and x.device.type == "cpu":
        # One token (decoding): the recurrence is a single step, no chunk to pad out.
        return ssd_sequential(x, dt, A, B, C, D, initial_state, reset)
    fn: Callable = _BACKENDS[select_backend(x.device, backend)]
    return fn(x, dt, A, B, C, D, initial_state, reset, chunk_size)


# --- Fused decode / norm kernels: Triton on CUDA tensors, PyTorch elsewhere --------------------
# One function each for the generation engine; the PyTorch forms compute the same in the
# reference's terms and serve the CPU (and CUDA when Triton is missing).


def _gpu_kernels(t: torch.Tensor):
    """mambaify.ops.triton for a CUDA tensor where Triton imports, else None."""
    if t.device.type != "cuda":
        return None
    try:
        from . import triton as kernels
    except ImportError:
        return None
    return kernels


def ssd_step_inplace(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ssd_step` updating ``state`` (b,h,n,p) in place; y (b,h,p) goes to ``out`` if given.
    On CUDA one fused kernel that allocates nothing when ``out`` is given (CUDA-graph safe)."""
    kernels = _gpu_kernels(state)
    if kernels is not None:
        return kernels.ssd_step_inplace(state, x, dt, A, B, C, D, out)
    y, new_state = ssd_step(state, x, dt, A, B, C, D)
    state.copy_(new_state)
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
    kernels = _gpu_kernels(conv_state)
    if kernels is not None:
        return kernels.conv_step_inplace(conv_state, x, weight, bias, silu, out)
    y, new_state = causal_conv1d(x[:, None], weight, bias, conv_state)
    y = torch.nn.functional.silu(y[:, 0]) if silu else y[:, 0]
    conv_state.copy_(new_state)
    return y if out is None else out.copy_(y)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * RMSNorm(y * silu(z)) over the last dim, as ``models.modeling.GatedRMSNorm``
    computes it (differentiable on both paths)."""
    kernels = _gpu_kernels(y)
    if kernels is not None:
        return kernels.gated_rmsnorm(y, z, weight, eps)
    compute = torch.promote_types(y.dtype, torch.float32)
    h = y.to(compute) * torch.nn.functional.silu(z.to(compute))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(y.dtype)


__all__ = [
    "SSDScan",
    "available_backends",
    "causal_conv1d",
    "conv_step_inplace",
    "gated_rmsnorm",
    "reference",
    "register_backend",
    "segsum",
    "select_backend",
    "ssd_chunked",
    "ssd_scan",
    "ssd_sequential",
    "ssd_step",
    "ssd_step_inplace",
]
