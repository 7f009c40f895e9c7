"""Loading a model to generate with: a saved folder (a hybrid or any causal LM) or a teacher name."""

from __future__ import annotations

from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU; a torch.dtype is itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_for_generation(name_or_path: str, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """(model, tokenizer) in eval mode on the device: what generate, chat, the speculative engine's
    draft and distill-draft's target and draft source load.

    A folder with a config.json loads through the Auto classes (a saved hybrid too, since
    importing mambaify registers it) with the tokenizer saved beside it; anything else is a
    teacher for :func:`mambaify.load_teacher` (a .gguf file, a hub id, a built-in name). Either
    way the tokenizer gets a pad token if it has none. ``device`` and ``dtype`` are "auto" (the
    GPU if there is one; bfloat16 there, float32 on the CPU) or explicit.
    """
    import mambaify  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    from ..teachers import load_folder_tokenizer, load_teacher, ready_for_inference

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if (Path(name_or_path) / "config.json").is_file():
        model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, output_loading_info=True)
        if missing := info.get("missing_keys"):
            # Freshly initialised weights would generate (or teach a draft) noise without a word.
            raise ValueError(f"{name_or_path} lacks {len(missing)} weight(s) of its model ({', '.join(sorted(missing)[:3])}"
                             ", ...): not a complete checkpoint; save it again with save_pretrained")
        return ready_for_inference(model, load_folder_tokenizer(name_or_path), target)
    return load_teacher(name_or_path, dtype=torch_dtype, device=target)


__all__ = ["load_for_generation", "resolve_device", "resolve_dtype"]
