"""Configuration of an attention/Mamba2 hybrid converted from a Llama-family teacher.

The hybrid config is the teacher's config plus a few fields of its own: it carries every
architecture field of the teacher (so the kept attention layers, MLPs and norms are built by the
teacher's own classes from it), ``base_model_type`` (which teacher family those classes come
from), ``attn_layers`` (the layer indices kept as attention) and the Mamba2 settings.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Teacher families whose attention, MLP and norm classes the hybrid reuses.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Fields that belong to the hybrid, not to the teacher; everything else is the teacher's.
HYBRID_FIELDS = frozenset(
    {
        "base_model_type",
        "attn_layers",
        "mamba_d_state",
        "mamba_head_dim",
        "mamba_num_heads",
        "mamba_num_xb_heads",
        "mamba_d_conv",
        "mamba_conv_bias",
        "mamba_proj_bias",
        "mamba_out_proj_bias",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "mamba_A_init_range",
        "mamba_chunk_size",
    }
)
# Bookkeeping keys a config dict carries that are no architecture field.
_META_FIELDS = frozenset({"model_type", "architectures", "transformers_version", "auto_map", "dtype"})


@strict
class HybridConfig(PreTrainedConfig):
    r"""Config of :class:`~mambaify.models.modeling.HybridForCausalLM`.

    Teacher fields that are not declared below (``rope_parameters`` aside, e.g. Qwen2's
    ``layer_types`` or Mistral's ``sliding_window``) are kept as extra attributes and saved.

    Mamba2 settings (one SSM head per attention head, as the conversion needs):
        mamba_num_heads: SSM heads (= attention heads).
        mamba_head_dim: value width per head, p (= attention head_dim).
        mamba_d_state: state / key width per head, n (= attention head_dim).
        mamba_num_xb_heads: heads computed for x and B before being repeated to all heads
            (= the teacher's key/value heads, grouped-query attention).
        mamba_d_conv: width of the causal depthwise conv over x, B, C.
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor: range of the initial step size dt.
        mamba_A_init_range: A = -U(lo, hi) at initialisation.
        mamba_chunk_size: chunk length of the SSD scan.
    """

    model_type = "mambaify_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    base_model_type: str = "llama"
    attn_layers: list[int] | None = None

    # Teacher architecture fields every supported family has.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int | None = 0.0
    mlp_bias: bool = False

    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    mamba_d_state: int | None = None
    mamba_num_xb_heads: int | None = None
    mamba_d_conv: int = 4
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool | None = None
    mamba_out_proj_bias: bool = False
    mamba_dt_min: float = 1e-3
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_A_init_range: list[float] | tuple[float, float] = (1.0, 16.0)
    mamba_chunk_size: int = 64

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attn_layers is None:
            self.attn_layers = list(range(self.num_hidden_layers))
        self.attn_layers = sorted(int(i) for i in self.attn_layers)
        if self.mamba_num_heads is None:
            self.mamba_num_heads = self.num_attention_heads
        if self.mamba_head_dim is None:
            self.mamba_head_dim = self.head_dim
        if self.mamba_d_state is None:
            self.mamba_d_state = self.head_dim
        if self.mamba_num_xb_heads is None:
            self.mamba_num_xb_heads = self.num_key_value_heads
        if self.mamba_proj_bias is None:
            self.mamba_proj_bias = bool(self.attention_bias)
        self.mamba_A_init_range = [float(v) for v in self.mamba_A_init_range]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.base_model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(
                f"base_model_type {self.base_model_type!r} is not supported; "
                f"supported teacher families: {', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
            )
        bad = [i for i in self.attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"attn_layers {bad} out of range for a model of {self.num_hidden_layers} layers"
            )
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers has duplicates: {self.attn_layers}")
        if self.mamba_num_heads % self.mamba_num_xb_heads:
            raise ValueError(
                f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of "
                f"mamba_num_xb_heads ({self.mamba_num_xb_heads})"
            )

    @property
    def layer_kinds(self) -> list[str]:
        """"attention" or "mamba" for each layer."""
        kept = set(self.attn_layers)
        return ["attention" if i in kept else "mamba" for i in range(self.num_hidden_layers)]

    @property
    def mamba_layers(self) -> list[int]:
        kept = set(self.attn_layers)
        return [i for i in range(self.num_hidden_layers) if i not in kept]

    def teacher_fields(self) -> dict:
        """The teacher's part of this config, as a plain dict."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in HYBRID_FIELDS and k not in _META_FIELDS and not k.startswith("_")
        }

    def to_base_config(self) -> PreTrainedConfig:
        """Rebuild the teacher-family config (e.g. a LlamaConfig) from this one."""
        base = CONFIG_MAPPING[self.base_model_type](**self.teacher_fields())
        base._attn_implementation = self._attn_implementation
        return base

    @classmethod
    def from_base_config(cls, base: PreTrainedConfig, **hybrid_fields) -> "HybridConfig":
        """A hybrid config for a teacher config; hybrid_fields sets attn_layers and mamba_*."""
        if base.model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(
                f"teacher architecture {base.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_BASE_MODEL_TYPES)} (Llama-family decoders)"
            )
        fields = {
            k: v for k, v in base.to_dict().items() if k not in _META_FIELDS and not k.startswith("_")
        }
        fields.update(hybrid_fields)
        return cls(base_model_type=base.model_type, **fields)


__all__ = ["HybridConfig", "SUPPORTED_BASE_MODEL_TYPES"]
