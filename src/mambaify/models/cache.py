"""The generation cache of a hybrid: keys/values for attention layers, (conv, SSM) state for Mamba.

It is a ``transformers`` :class:`~transformers.Cache`, so ``generate()`` and the teacher's
attention modules use it as they use a ``DynamicCache``: attention layers hold transformers'
own ``DynamicLayer``; Mamba layers hold a :class:`MambaLayerCache`, which keeps a fixed-size state
whatever the length, and counts the tokens it has seen so the cache knows its length even when
no attention layer is left (0% attention).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class MambaLayerCache(CacheLayerMixin):
    """State of one Mamba2 layer: the last ``d_conv - 1`` conv inputs and the SSM state."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.conv_state: torch.Tensor | None = None  # (batch, conv channels, d_conv - 1)
        self.ssm_state: torch.Tensor | None = None  # (batch, heads, d_state, head_dim)
        self.seen_tokens = 0

    # --- what the Mamba mixer calls ---
    def update_state(self, conv_state: torch.Tensor, ssm_state: torch.Tensor, num_new_tokens: int) -> None:
        self.conv_state = conv_state
        self.ssm_state = ssm_state
        self.seen_tokens += num_new_tokens
        self.is_initialized = True

    # --- the CacheLayerMixin interface ---
    def lazy_initialization(self, *args, **kwargs) -> None:  # states arrive whole from the mixer
        pass

    def update(self, *args, **kwargs):
        raise TypeError("a Mamba layer keeps no keys/values; the mixer calls update_state()")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensors(self):
        return [name for name in ("conv_state", "ssm_state") if getattr(self, name) is not None]

    def reset(self) -> None:
        self.conv_state = self.ssm_state = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name)[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        # A recurrent state cannot be rewound: speculative decoding replays instead (generate/).
        if tokens_to_remove:
            raise RuntimeError(
                "a Mamba layer's state cannot be cropped; use mambaify's speculative decoder, "
                "which replays accepted tokens instead of rewinding"
            )

    def offload(self) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # states are moved back by the mixer when it reads them
        pass


class HybridCache(Cache):
    """One cache layer per decoder layer, of the kind the layer needs."""

    def __init__(self, layer_kinds: list[str]):
        layers = [DynamicLayer() if kind == "attention" else MambaLayerCache() for kind in layer_kinds]
        super().__init__(layers=layers)

    def mamba_layer(self, layer_idx: int) -> MambaLayerCache:
        layer = self.layers[layer_idx]
        if not isinstance(layer, MambaLayerCache):
            raise TypeError(f"layer {layer_idx} of the cache is not a Mamba layer")
        return layer


__all__ = ["HybridCache", "MambaLayerCache"]
