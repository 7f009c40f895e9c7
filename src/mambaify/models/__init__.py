"""The hybrid model: config, modeling (one readable file) and cache."""

from .cache import HybridCache, MambaLayerCache
from .configuration import SUPPORTED_BASE_MODEL_TYPES, HybridConfig
from .modeling import GatedRMSNorm, HybridForCausalLM, HybridModel, HybridPreTrainedModel, Mamba2Mixer

__all__ = [
    "SUPPORTED_BASE_MODEL_TYPES",
    "GatedRMSNorm",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "HybridPreTrainedModel",
    "Mamba2Mixer",
    "MambaLayerCache",
]
