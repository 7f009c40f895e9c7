"""GPU kernels behind :mod:`mambaify.ops`.

Importing this package needs Triton (an ImportError tells :mod:`mambaify.ops` that there are no
GPU kernels). It holds our own Triton kernels for decoding (:mod:`.decode`), speculative
verification (:mod:`.verify`), the gated RMSNorm (:mod:`.norm`) and a few-row linear layer
(:mod:`.gemv`: decode's matrix-vector products, an attention layer's q, k and v in one), and registers the ``fla``
scan backend (:mod:`.fla_scan`), preferred for CUDA tensors, where fla-core imports and CUDA is
available.
"""

from __future__ import annotations

import logging

import torch
import triton  # noqa: F401  (the ImportError that says "no GPU kernels here")

from .. import register_backend
from .decode import conv_ssd_step_inplace, conv_step_inplace, ssd_step, ssd_step_inplace
from .gemv import small_batch_gated_up, small_batch_linear, small_batch_linear_prepare_norm, small_batch_qkv
from .norm import gated_rmsnorm
from .verify import conv_verify_inplace, ssd_verify_inplace, ssd_verify_store_states

logger = logging.getLogger(__name__)


def _register_fla() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from .fla_scan import fla_ssd_scan
    except Exception as err:  # not installed, or failing to import on this platform: keep the reference
        logger.info("fla scan backend unavailable: %s", err)
        return False
    # Compiler-disabled: a compiled training step (distill --compile) calls fla's autotuned
    # kernels as they are, a graph break, rather than have dynamo trace their launchers.
    register_backend("fla", torch.compiler.disable(fla_ssd_scan), cuda_preferred=True)
    return True


FLA_AVAILABLE = _register_fla()

__all__ = [
    "FLA_AVAILABLE",
    "conv_ssd_step_inplace",
    "conv_step_inplace",
    "conv_verify_inplace",
    "gated_rmsnorm",
    "small_batch_gated_up",
    "small_batch_linear",
    "small_batch_linear_prepare_norm",
    "small_batch_qkv",
    "ssd_step",
    "ssd_step_inplace",
    "ssd_verify_inplace",
    "ssd_verify_store_states",
]
