"""Attention of a few new tokens over a static key/value cache (decode: t = 1; speculative
verify: t = K + 1), with the visible keys given by slots rather than by a dense mask.

The cache of an attention layer is a static buffer of S slots per row. Row b's first real token
sits at slot kv_start[b] (left padding before it), and query token i of row b was written at slot
query_slots[b, i]. Key slot s is visible to query (b, i), with q = query_slots[b, i], iff

    kv_start[b] <= s <= q   and   (sliding_window is None or q - s < sliding_window),

and a query on a padding slot (q < kv_start[b]) sees its own slot only, as the generation
engine's prefill mask has it, so that every query sees at least one key. Grouped-query attention:
query head j reads kv head j // (h // kv_heads).

:func:`decode_attention` runs the Triton flash-decoding kernels
(:mod:`mambaify.ops.triton.decode_attention`) on CUDA tensors where Triton imports, and
:func:`decode_attention_reference` (plain PyTorch, float64 for float64 inputs) elsewhere; the
reference is also the tests' oracle. :func:`attention_mask_from_slots` is the rule above as a
dense mask, for the SDPA path.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def attention_mask_from_slots(
    kv_start: torch.Tensor, query_slots: torch.Tensor, num_slots: int, sliding_window: int | None = None
) -> torch.Tensor:
    """The visibility rule of this module as a (b, 1, t, num_slots) bool mask: True where query
    (b, i) may see key slot s. kv_start (b,), query_slots (b, t) (or (t,), shared by all rows)."""
    b = kv_start.shape[0]
    query_slots = query_slots.expand(b, query_slots.shape[-1])
    slots = torch.arange(num_slots, device=query_slots.device)
    q = query_slots[:, :, None]
    visible = (slots >= kv_start[:, None, None]) & (slots <= q)
    if sliding_window is not None:
        visible &= q - slots < sliding_window
    visible |= slots == q
    return visible[:, None]


def check_attention_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_start: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None,
    what: str = "decode_attention",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise a ValueError naming the problem unless the shapes, dtypes and devices fit; return
    kv_start as (b,) and query_slots as (b, t) (broadcast views of what was given)."""
    if query.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            f"{what}: query must be (b, h, t, d) and keys/values (b, kv_heads, S, d); "
            f"got query {tuple(query.shape)}, keys {tuple(keys.shape)}"
        )
    b, h, t, d = query.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    if values.shape != keys.shape:
        raise ValueError(f"{what}: values {tuple(values.shape)} must have the shape of keys {tuple(keys.shape)}")
    if keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(
            f"{what}: keys {tuple(keys.shape)} must be (b={b}, kv_heads, S, d={d}) for query {tuple(query.shape)}"
        )
    if kv_heads < 1 or h % kv_heads:
        raise ValueError(f"{what}: the {h} query heads must be a multiple of the {kv_heads} kv heads")
    if S < 1 or t < 1 or d < 1:
        raise ValueError(f"{what}: empty input: S={S} slots, t={t} query tokens, head_dim={d}")
    if query.dtype not in _DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(
            f"{what}: query, keys and values must share one of bfloat16/float16/float32/float64; got "
            f"{query.dtype}, {keys.dtype}, {values.dtype} (cast them to the cache's dtype)"
        )
    for name, slots in (("kv_start", kv_start), ("query_slots", query_slots)):
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise ValueError(f"{what}: {name} must be an integer tensor, got {slots.dtype}")
    tensors = [("keys", keys), ("values", values), ("kv_start", kv_start), ("query_slots", query_slots)]
    if out is not None:
        tensors.append(("out", out))
    for name, tensor in tensors:
        if tensor.device != query.device:
            raise ValueError(f"{what}: {name} is on {tensor.device} but query on {query.device}; move them to one device")
    if kv_start.dim() > 1 or (kv_start.dim() == 1 and kv_start.shape[0] not in (1, b)):
        raise ValueError(f"{what}: kv_start must be (b,) = ({b},), got {tuple(kv_start.shape)}")
    if query_slots.dim() not in (1, 2) or query_slots.shape[-1] != t or (
        query_slots.dim() == 2 and query_slots.shape[0] not in (1, b)
    ):
        raise ValueError(f"{what}: query_slots must be (b, t) = ({b}, {t}) (or (t,)), got {tuple(query_slots.shape)}")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        raise ValueError(f"{what}: sliding_window must be None or a positive int, got {sliding_window!r}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"{what}: scale must be a Python number (a tensor would need a host sync), got {type(scale)}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(
            f"{what}: out must be {tuple(query.shape)} {query.dtype} like query, got {tuple(out.shape)} {out.dtype}"
        )
    return kv_start.reshape(-1).expand(b), query_slots.expand(b, t)


def check_slot_values(
    kv_start: torch.Tensor, query_slots: torch.Tensor, num_slots: int, check: bool | None = None, what: str = "decode_attention"
) -> None:
    """Raise a ValueError unless 0 <= kv_start <= S and 0 <= query_slots < S.

    Reading a CUDA tensor's values waits for the GPU, which a CUDA graph cannot do while it is
    captured: ``check=None`` checks except during a capture, ``False`` never (the kernel clamps
    slots into the buffer, so memory stays safe, but the result would be wrong), ``True`` always.
    """
    if check is None:
        check = not (query_slots.is_cuda and torch.cuda.is_current_stream_capturing())
    if not check:
        return
    lo, hi = int(query_slots.min()), int(query_slots.max())
    if lo < 0 or hi >= num_slots:
        raise ValueError(f"{what}: query_slots must lie in [0, {num_slots - 1}] (the cache's slots), got [{lo}, {hi}]")
    lo, hi = int(kv_start.min()), int(kv_start.max())
    if lo < 0 or hi > num_slots:
        raise ValueError(f"{what}: kv_start must lie in [0, {num_slots}] (first real slot of each row), got [{lo}, {hi}]")


def decode_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_start: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    check_values: bool | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the visible slots, in plain PyTorch (float64 for float64
    inputs, float32 otherwise). Values at slots no query of the row sees are zeroed before the
    product, so whatever those slots hold (NaN included) stays out of the result, as in the kernel.
    Shapes as :func:`decode_attention`."""
    kv_start, query_slots = check_attention_inputs(
        query, keys, values, kv_start, query_slots, scale, sliding_window, out, what="decode_attention_reference"
    )
    b, h, t, d = query.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    check_slot_values(kv_start, query_slots, S, check_values, what="decode_attention_reference")
    group = h // kv_heads
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    visible = attention_mask_from_slots(kv_start, query_slots, S, sliding_window)  # (b, 1, t, S)
    visible = visible[:, :, None].expand(b, 1, group, t, S).reshape(b, 1, group * t, S)
    seen = visible.any(dim=2, keepdim=True).transpose(-1, -2)  # (b, 1, S, 1): slots any query sees
    q = query.to(compute).reshape(b, kv_heads, group * t, d)
    k = torch.where(seen, keys.to(compute), 0.0)
    v = torch.where(seen, values.to(compute), 0.0)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    result = (torch.softmax(scores, dim=-1) @ v).reshape(b, h, t, d).to(query.dtype)
    return result if out is None else out.copy_(result)


def _triton_kernels(query: torch.Tensor):
    """The Triton module for a CUDA tensor of a dtype it serves on the GPU, else None."""
    if query.device.type != "cuda" or query.dtype == torch.float64:
        return None
    try:
        from .triton import decode_attention as kernels
    except ImportError:
        return None
    return kernels


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
    check_values: bool | None = None,
) -> torch.Tensor:
    """Attention of t new tokens per row over a static KV cache, GQA, visibility by slots (see
    the module docstring).

    query (b, h, t, d); keys, values (b, kv_heads, S, d) with h a multiple of kv_heads;
    kv_start (b,) integer, the first real slot of each row; query_slots (b, t) integer (or (t,),
    shared by all rows), the slot each query token's own key was written at; scale the factor
    on q.k. Returns (b, h, t, d) in query's dtype, written into ``out`` if given.

    On CUDA (bf16/fp16/fp32) the Triton flash-decoding kernels: float32 accumulation, the key
    sequence split over programs (``num_splits`` overrides the automatic count), no host sync
    when ``out`` is given after a warm-up call of the same shape, so a CUDA graph may capture it.
    ``check_values`` (slot ranges; it reads them on the host): see
    :func:`check_slot_values`. Elsewhere :func:`decode_attention_reference`.
    """
    kernels = _triton_kernels(query)
    if kernels is not None:
        return kernels.decode_attention(
            query, keys, values, kv_start, query_slots, scale, sliding_window, out,
            num_splits=num_splits, check_values=check_values,
        )
    return decode_attention_reference(
        query, keys, values, kv_start, query_slots, scale, sliding_window, out, check_values=check_values
    )


def decode_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_start: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """:func:`decode_attention` as seen by ``torch.compile``: an opaque custom op (the compiler
    would otherwise trace into the Triton launcher); eager calls go straight to the function."""
    if torch.compiler.is_compiling():
        return torch.ops.mambaify.decode_attention(query, keys, values, kv_start, query_slots, scale, sliding_window)
    return decode_attention(query, keys, values, kv_start, query_slots, scale, sliding_window)


@torch.library.custom_op("mambaify::decode_attention", mutates_args=())
def _decode_attention_custom_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_start: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    # Slot values are not checked here: a compiled step is replayed from a CUDA graph. The result
    # has query's layout on every path, as the fake says (the PyTorch path's own is contiguous;
    # the two differ once t > 1, in a speculative verify call).
    out = torch.empty_like(query)
    return decode_attention(
        query, keys, values, kv_start, query_slots, scale, sliding_window, out, check_values=False
    )


@_decode_attention_custom_op.register_fake
def _(query, keys, values, kv_start, query_slots, scale, sliding_window):
    return torch.empty_like(query)


__all__ = [
    "attention_mask_from_slots",
    "check_attention_inputs",
    "check_slot_values",
    "decode_attention",
    "decode_attention_op",
    "decode_attention_reference",
]
