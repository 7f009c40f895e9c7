"""Loading a model to generate with: a saved folder (a hybrid or any causal LM) or a teacher name."""

from __future__ import annotations

from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_for_generation(name_or_path: str, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode on the device.

    A folder with a config.json loads through the Auto classes (a saved hybrid too, since
    importing mambaify registers it); anything else is a teacher for :func:`mambaify.load_teacher`
    (a .gguf file, a hub id, a built-in name).
    """
    import mambaify  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    from ..teachers import load_folder_tokenizer, load_teacher

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if (Path(name_or_path) / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
        tokenizer = load_folder_tokenizer(name_or_path)
        return model.to(target).eval(), tokenizer
    return load_teacher(name_or_path, dtype=torch_dtype, device=target)


__all__ = ["load_for_generation", "resolve_device", "resolve_dtype"]
