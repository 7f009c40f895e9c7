"""The SSD scan on flash-linear-attention's (fla-core) chunked gated-linear-attention kernels.

Mamba2's SSD is gated linear attention with q = C, k = B, v = dt * x and a scalar log-decay
g = dt * A per head and step; the state layout [N, H, K, V] of fla is our (b, h, n, p).

Two fla kernels compute it:

* ``fla.ops.simple_gla.chunk_simple_gla`` takes the scalar decay g (B, T, H) as it is. Its
  forward is right everywhere, but its gated backward refuses to run on Hopper with
  3.4 <= triton < 3.7.1 (fla issue 640: those triton versions miscompile it).
* ``fla.ops.gla.chunk_gla`` takes a decay per key channel (B, T, H, K); the scalar decay
  broadcast over K gives the same function, at the cost of a K times larger g, and its
  backward runs on that setup.

So the forward (no gradient needed) always uses chunk_simple_gla, and training uses it too
unless the machine is a Hopper GPU with an affected triton, where it uses chunk_gla.

fla's conventions handled here: inputs are [B, T, H, D] (no head-first), the default score
scale K^-0.5 is overridden with 1.0, the initial state must be float32 for chunk_gla and is
float32 for both, the final state is asked for with ``output_final_state=True``. fla picks its
own chunk length (64, or the power of two it is given), so ``chunk_size`` (a tuning knob of the
reference's algorithm, not part of the result) is not passed on.

Packed documents (``reset``): fla's varlen mode (``cu_seqlens``, batch 1, one initial and one
final state per segment) computes independent segments; the batch is flattened into one row
cut at every row start and every reset, each row's initial state goes to its first segment
(unless that token is itself a reset) and each row's final state is its last segment's. Finding
the cuts reads ``reset`` on the host (one synchronisation); a reset only at t = 0 (every
prompt's first token) needs no varlen and just drops that row's initial state.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import triton
from fla.ops.gla import chunk_gla
from fla.ops.simple_gla import chunk_simple_gla
from packaging.version import Version

from ..reference import ssd_chunked

Kernel = Literal["auto", "simple_gla", "gla"]

# fla's kernels multiply [.., K] and [.., V] tiles with tl.dot, which needs every tile dimension
# to be at least 16 (a 12-wide head fails to compile in chunk_gla's backward, seen on the H200).
FLA_MIN_HEAD_DIM = 16


@functools.cache
def simple_gla_backward_ok(device_index: int) -> bool:
    """False where chunk_simple_gla's gated backward refuses to run (Hopper, 3.4 <= triton < 3.7.1)."""
    major, _ = torch.cuda.get_device_capability(device_index)
    version = Version(triton.__version__).release
    return not (major == 9 and (3, 4) <= version < (3, 7, 1))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _segments(reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the flattened batch (b*t tokens) at row starts and resets.

    Returns, on the CPU: cu_seqlens (N+1) int64; for each segment its row and whether it carries
    the row's initial state; for each row the index of its last segment.
    """
    b, t = reset.shape
    starts = reset.detach().to("cpu", torch.bool).clone()
    carries_state = ~starts[:, 0]  # a row whose first token is a reset drops its initial state
    starts[:, 0] = True
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = torch.cat([first, first.new_tensor([b * t])])
    seg_row = first // t
    is_row_start = first % t == 0
    seg_carries = is_row_start & carries_state[seg_row]
    row_first_seg = is_row_start.nonzero().squeeze(1)
    row_last_seg = torch.cat([row_first_seg[1:] - 1, row_first_seg.new_tensor([len(first) - 1])])
    return cu_seqlens, seg_row, seg_carries, row_last_seg


def _gla(q, k, v, g, kernel: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "simple_gla":
        return chunk_simple_gla(q, k, v, g=g, scale=1.0, output_final_state=True, **kwargs)
    # chunk_gla: the per-head decay repeated for every key channel (same function, see above).
    gk = g[..., None].expand(*g.shape, q.shape[-1])
    return chunk_gla(q, k, v, gk, scale=1.0, output_final_state=True, **kwargs)


def fla_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    kernel: Kernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan (see :func:`mambaify.ops.reference.ssd_sequential`) on fla's kernels.

    ``kernel`` forces one of fla's two kernels (benchmarks, tests); "auto" chooses as the module
    docstring says. Returns y (b,t,h,p) in x's dtype and the final state (b,h,n,p) in float32.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    if kernel == "auto":
        # D is applied outside fla: only the other inputs need fla's backward.
        train = _needs_grad(x, dt, A, B, C, initial_state)
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        kernel = "gla" if train and not simple_gla_backward_ok(device) else "simple_gla"

    # Explicit dtypes instead of autocast: q, k, v in the inputs' (half) precision, decays and
    # states in float32, as the reference keeps them.
    with torch.autocast(device_type=x.device.type, enabled=False):
        io = torch.promote_types(x.dtype, torch.promote_types(B.dtype, C.dtype))
        dt32 = dt.float()
        g = dt32 * A.float()  # (b, t, h)
        q, k = C.to(io), B.to(io)
        v = (dt32[..., None] * x.float()).to(io)
        h0 = initial_state.float() if initial_state is not None else None

        if reset is None:
            o, final = _gla(q, k, v, g, kernel, initial_state=h0)
        else:
            # Resets derived from shared position ids come as (1, t) and hold for every row, as
            # in the reference; cutting the segments from that one row would leave the other
            # rows out of fla's varlen call (their outputs unwritten: NaN perplexity on the H200).
            cu_cpu, seg_row, seg_carries, row_last = _segments(reset.expand(b, t))
            if len(cu_cpu) - 1 == b:  # resets at most at t = 0: one segment per row
                if h0 is not None:
                    h0 = h0 * seg_carries.to(h0.device, h0.dtype)[:, None, None, None]
                o, final = _gla(q, k, v, g, kernel, initial_state=h0)
            else:
                segs = len(cu_cpu) - 1
                h0_seg = x.new_zeros(segs, h, n, p, dtype=torch.float32)
                if h0 is not None:
                    carry = seg_carries.nonzero().squeeze(1)
                    h0_seg = h0_seg.index_copy(0, carry.to(x.device), h0[seg_row[carry].to(x.device)])
                flat = lambda u: u.reshape(1, b * t, *u.shape[2:])  # noqa: E731
                o, final_seg = _gla(
                    flat(q), flat(k), flat(v), flat(g), kernel,
                    initial_state=h0_seg,
                    cu_seqlens=cu_cpu.to(x.device),
                    cu_seqlens_cpu=cu_cpu,
                )
                o = o.reshape(b, t, h, p)
                final = final_seg[row_last.to(x.device)]

        y = o.float()
        if D is not None:
            y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), final


def fla_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fla`` backend of :func:`mambaify.ops.ssd_scan` (the ``SSDScan`` signature).

    float64 (exactness tests), empty sequences and heads narrower than fla's tiles
    (:data:`FLA_MIN_HEAD_DIM`, in x's head dim or the state dim) go to the reference, which fla
    does not serve.
    """
    if x.dtype == torch.float64 or x.shape[1] == 0 or min(x.shape[-1], B.shape[-1]) < FLA_MIN_HEAD_DIM:
        return ssd_chunked(x, dt, A, B, C, D, initial_state, reset, chunk_size)
    return fla_scan(x, dt, A, B, C, D, initial_state, reset)
