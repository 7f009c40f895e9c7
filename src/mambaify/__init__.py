"""mambaify: turn a Llama-family Transformer into an attention/Mamba2 hybrid, distil it, serve it.

    import mambaify
    teacher, tokenizer = mambaify.load_teacher("smollm2-135m-instruct")
    hybrid = mambaify.convert(teacher, attention=0.5)
    hybrid.save_pretrained("out")      # later: AutoModelForCausalLM.from_pretrained("out")

Importing the package registers the hybrid with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import UnsupportedArchitectureError, attention_layers_for, convert
from .models import HybridCache, HybridConfig, HybridForCausalLM, HybridModel

__version__ = "0.1.0"

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)


def load_teacher(name_or_path: str, **kwargs):
    """Load a teacher: a local HF folder, a hub id, a .gguf file or a built-in name -> (model, tokenizer)."""
    from .teachers import load_teacher as _load

    return _load(name_or_path, **kwargs)


def build_draft_from_teacher(teacher, layers=None, **kwargs):
    """A speculative-decoding draft made of ``teacher``'s own layers (default: first and last);
    see :func:`mambaify.draft.build_draft_from_teacher`."""
    from .draft import build_draft_from_teacher as _build

    return _build(teacher, layers, **kwargs)


__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "UnsupportedArchitectureError",
    "attention_layers_for",
    "build_draft_from_teacher",
    "convert",
    "load_teacher",
    "__version__",
]
