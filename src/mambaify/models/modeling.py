"""The attention/Mamba2 hybrid causal LM.

Every decoder layer is the teacher's: input norm, token mixer, post norm, MLP. Layers listed in
``config.attn_layers`` keep the teacher's own attention class (built by the teacher family's
modeling file, so a kept layer computes exactly what it did in the teacher); the others get a
:class:`Mamba2Mixer` whose projections start as the attention's Q/K/V/O (see ``convert.py``).

Reading order: GatedRMSNorm -> Mamba2Mixer -> HybridDecoderLayer -> HybridModel -> HybridForCausalLM.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import fields
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .. import ops
from .cache import HybridCache, MambaLayerCache
from .configuration import HybridConfig
from .remote_code import AUTO_MAP, write_remote_code

# transformers renamed the cache argument and output field from `past_key_values` to `cache` in
# 5.2x; support both spellings so one checkpoint works across the versions we accept.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def teacher_classes(base_model_type: str) -> SimpleNamespace:
    """The teacher family's attention, MLP, RMSNorm and rotary-embedding classes."""
    prefix = _FAMILIES[base_model_type]
    module = importlib.import_module(f"transformers.models.{base_model_type}.modeling_{base_model_type}")
    attention = getattr(module, f"{prefix}Attention")
    params = inspect.signature(attention.forward).parameters
    return SimpleNamespace(
        attention=attention,
        attention_cache_kw="cache" if "cache" in params else "past_key_values",
        mlp=getattr(module, f"{prefix}MLP"),
        norm=getattr(module, f"{prefix}RMSNorm"),
        rotary=getattr(module, f"{prefix}RotaryEmbedding"),
    )


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over the whole inner width, as Mamba2 gates its output."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # A fused Triton kernel on CUDA, plain PyTorch elsewhere (ops.gated_rmsnorm).
        return ops.gated_rmsnorm(hidden_states, gate, self.weight, self.variance_epsilon)


class Mamba2Mixer(nn.Module):
    """A Mamba2 (SSD) token mixer laid out so that it can start as the attention it replaces.

    in_proj emits, in order, z (gate, width h*p), x (value, kv-heads*p), B (key, kv-heads*n),
    C (query, h*n) and dt (h). x, B and C pass the causal conv and SiLU; x and B are then
    repeated from the kv heads to all h heads, as grouped-query attention repeats K and V.
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.d_state = config.mamba_d_state
        self.num_xb_heads = config.mamba_num_xb_heads
        self.chunk_size = config.mamba_chunk_size
        self.d_conv = config.mamba_d_conv
        self.dt_min, self.dt_max = config.mamba_dt_min, config.mamba_dt_max
        self.dt_init_floor = config.mamba_dt_init_floor
        self.A_init_range = tuple(config.mamba_A_init_range)

        self.d_inner = self.num_heads * self.head_dim
        self.d_x = self.num_xb_heads * self.head_dim
        self.d_b = self.num_xb_heads * self.d_state
        self.d_c = self.num_heads * self.d_state
        self.conv_dim = self.d_x + self.d_b + self.d_c

        self.in_proj = nn.Linear(
            config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=config.mamba_proj_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.d_conv,
            groups=self.conv_dim,
            padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_out_proj_bias)

    @property
    def in_proj_slices(self) -> dict[str, slice]:
        """Rows of in_proj that produce z, x, B, C and dt."""
        out, start = {}, 0
        for name, width in (
            ("z", self.d_inner),
            ("x", self.d_x),
            ("B", self.d_b),
            ("C", self.d_c),
            ("dt", self.num_heads),
        ):
            out[name] = slice(start, start + width)
            start += width
        return out

    def init_ssm_parameters(self) -> None:
        """The paper's initialisation of the parameters attention has no counterpart for."""
        lo, hi = self.A_init_range
        A = torch.empty(self.num_heads).uniform_(lo, hi)
        init.copy_(self.A_log, torch.log(A))
        log_dt = torch.empty(self.num_heads).uniform_(math.log(self.dt_min), math.log(self.dt_max))
        dt = torch.exp(log_dt).clamp(min=self.dt_init_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.ones_(self.D)
        init.ones_(self.norm.weight)
        # PyTorch's default Conv1d initialisation (the paper keeps it).
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            bound = 1 / math.sqrt(self.d_conv)  # fan-in of a depthwise filter
            init.uniform_(self.conv1d.bias, -bound, bound)

    @property
    def A(self) -> torch.Tensor:
        """The per-head decay rate A = -exp(A_log), in float32 at least (decays compound over time)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split_projection(self.in_proj(hidden_states))

    def split_projection(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj's output -> z (gate), xBC (conv input), dt (pre-softplus)."""
        z, xBC, dt = projected.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        return z, xBC, dt

    def split_groups(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split conv output (..., conv_dim) into x (..., xb heads, head_dim), B (..., xb heads,
        d_state) and C (..., heads, d_state): views, x and B still per kv head (the decode
        kernels read each head's group where it lies)."""
        x, B, C = xBC.split([self.d_x, self.d_b, self.d_c], dim=-1)
        return (x.unflatten(-1, (self.num_xb_heads, self.head_dim)), B.unflatten(-1, (self.num_xb_heads, self.d_state)),
                C.unflatten(-1, (self.num_heads, self.d_state)))

    def split_heads(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split conv output into per-head x, B, C, repeating x and B from the kv heads."""
        x, B, C = self.split_groups(xBC)
        rep = self.num_heads // self.num_xb_heads
        return x.repeat_interleave(rep, dim=-2), B.repeat_interleave(rep, dim=-2), C

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        seq_pos: torch.Tensor | None = None,
        cache: MambaLayerCache | None = None,
    ) -> torch.Tensor:
        """hidden_states (b,t,d). padding_mask (b,t): 0 marks padding, which must leave the
        state untouched. seq_pos (b,t) or (1,t): positions; a 0 starts a new document (packing)."""
        b, t, _ = hidden_states.shape
        z, xBC, dt = self.project(hidden_states)
        if padding_mask is not None:
            # Padding feeds zeros into the conv window (masked_fill, not a product, so that
            # whatever a pad position holds, even a NaN, cannot leak).
            pad = ~padding_mask[:, -t:].bool()[..., None]
            xBC = xBC.masked_fill(pad, 0.0)

        conv_state = cache.conv_state if cache is not None else None
        ssm_state = cache.ssm_state if cache is not None else None
        xBC, new_conv_state = ops.causal_conv1d(
            xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, seq_pos
        )
        x, B, C = self.split_heads(F.silu(xBC))
        dt = F.softplus(dt + self.dt_bias)
        if padding_mask is not None:
            dt = dt.masked_fill(pad, 0.0)  # dt = 0: decay 1 and nothing written
        reset = seq_pos == 0 if seq_pos is not None else None
        y, new_ssm_state = ops.ssd_scan(
            x, dt, self.A, B, C, self.D, initial_state=ssm_state, reset=reset, chunk_size=self.chunk_size
        )
        if cache is not None:
            cache.update_state(new_conv_state, new_ssm_state, t)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y)


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        family = teacher_classes(config.base_model_type)
        self.layer_idx = layer_idx
        self.is_attention = layer_idx in config.attn_layers
        self._cache_kw = family.attention_cache_kw
        if self.is_attention:
            self.self_attn = family.attention(config=config, layer_idx=layer_idx)
        else:
            self.mamba = Mamba2Mixer(config, layer_idx)
        self.mlp = family.mlp(config)
        self.input_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: HybridCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.is_attention:
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **{self._cache_kw: cache},
                **kwargs,
            )
        else:
            layer_cache = cache.mamba_layer(self.layer_idx) if cache is not None else None
            hidden_states = self.mamba(hidden_states, padding_mask, position_ids, layer_cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # The recurrent state cannot be rewound, so transformers' assisted decoding must not crop it.
    _is_stateful = True

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus what lets ``trust_remote_code=True`` load the
        folder in a process that never imported mambaify (:mod:`.remote_code`)."""
        self.config.auto_map = dict(AUTO_MAP)
        # A model loaded through that remote code has its classes registered "for auto class";
        # transformers would then copy their source files, relative imports and all, into the folder.
        self._auto_class = self.config._auto_class = None
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_remote_code(save_directory)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mamba2Mixer):
            module.init_ssm_parameters()
        elif isinstance(module, GatedRMSNorm):
            init.ones_(module.weight)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        family = teacher_classes(config.base_model_type)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = family.rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def _attention_kind(self, layer_idx: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return layer_types[layer_idx]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def _attention_masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """One mask per kind of attention layer present, built as the teacher builds it."""
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        kinds = {self._attention_kind(i) for i in self.config.attn_layers}
        # Positional arguments: the cache keyword itself was renamed across transformers versions.
        return {
            kind: makers[kind](self.config, inputs_embeds, attention_mask, cache, position_ids)
            for kind in kinds
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: HybridCache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(
                f"a hybrid model needs a mambaify HybridCache, got {type(cache).__name__}; "
                "pass none and the model makes one"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = HybridCache(self.config.layer_kinds)

        t = inputs_embeds.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None]

        # The Mamba layers read a 2D padding mask; a 4D mask is already the attention's.
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if padding_mask is not None and bool(padding_mask[:, -t:].all()):
            padding_mask = None

        masks, position_embeddings = {}, None
        if self.config.attn_layers:
            masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids)
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(self._attention_kind(i)) if layer.is_attention else None,
                padding_mask=padding_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states  # as in transformers: the last entry is after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: cache},
        )


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand us a DynamicCache: the model makes its own HybridCache.
        return False

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *args, assistant_model=None,
                 **kwargs):
        """transformers' generate(); given ``assistant_model`` (a draft model of the same tokenizer),
        mambaify's speculative engine instead, with ``num_assistant_tokens`` draft tokens per round
        (an int, or "auto"): see :func:`mambaify.generate.speculative_engine.assisted_generate`."""
        if assistant_model is None:
            return super().generate(inputs, generation_config, *args, **kwargs)
        if args:
            raise TypeError("with assistant_model, pass generate()'s options by keyword")
        from ..generate.speculative_engine import assisted_generate

        return assisted_generate(self, assistant_model, inputs, generation_config, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: HybridCache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


__all__ = [
    "GatedRMSNorm",
    "HybridDecoderLayer",
    "HybridForCausalLM",
    "HybridModel",
    "HybridPreTrainedModel",
    "Mamba2Mixer",
    "teacher_classes",
]
