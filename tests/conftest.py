"""Tiny random teachers of each supported family, for fast CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import mambaify  # noqa: F401  (registers the Auto classes)

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_teacher(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kwargs))
    else:
        raise ValueError(family)
    # Random init leaves q/k/v biases at zero; make them matter for Qwen2.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def family(request):
    return request.param


@pytest.fixture
def llama():
    return tiny_teacher("llama")


@pytest.fixture(scope="session")
def real_teacher_cache():
    """A cache for the real default teacher shared by the whole test session (and by later runs
    on the same machine), so the ~93 MB download and GGUF conversion happen once."""
    cache = Path(os.environ.get("MAMBAIFY_TEST_CACHE") or Path.home() / ".cache" / "mambaify-test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMBAIFY_CACHE", str(cache))
        yield cache
