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


__all__ = [
    "SSDScan",
    "available_backends",
    "causal_conv1d",
    "reference",
    "register_backend",
    "segsum",
    "select_backend",
    "ssd_chunked",
    "ssd_scan",
    "ssd_sequential",
    "ssd_step",
]
