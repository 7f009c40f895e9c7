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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny Llama teacher with a real (tiny) tokenizer, saved as a Hugging Face folder."""
    from tests._tiny_data import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """(chat JSONL for training, plain text for held-out perplexity) made from the tiny corpus."""
    import json

    from tests._tiny_data import CORPUS

    path = tmp_path_factory.mktemp("data")
    chats = path / "chat.jsonl"
    with chats.open("w") as f:
        for i, text in enumerate(CORPUS):
            messages = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": text}]
            f.write(json.dumps({"messages": messages}) + "\n")
    texts = path / "heldout.txt"
    texts.write_text("\n\n".join(CORPUS[:6]))
    return chats, texts


def recording_backend(seen: list[str]):
    """A torch.compile backend that runs the graph as traced and appends its calls to ``seen``."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    return backend


def run_compiled_and_eager(step, inputs: dict[str, torch.Tensor]):
    """``step(inputs)`` run eagerly and through torch.compile (fullgraph, :func:`recording_backend`),
    each on its own copy of ``inputs`` (steps write some in place). Returns (compiled outputs,
    eager outputs, the compiled copy, the eager copy, the mambaify custom ops the graph called,
    sorted)."""
    seen: list[str] = []
    eager_inputs = {k: v.clone() for k, v in inputs.items()}
    compiled_inputs = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        expected = step(eager_inputs)
        got = torch.compile(step, backend=recording_backend(seen), fullgraph=True)(compiled_inputs)
    ops = sorted(target.removesuffix(".default") for target in seen if target.startswith("mambaify."))
    return got, expected, compiled_inputs, eager_inputs, ops
