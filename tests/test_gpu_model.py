"""The whole hybrid on CUDA (fla scan, Triton gated norm, SDPA; bf16 and float32) against its float32
forward on the CPU, at the default teacher's widths, over sequences several scan chunks long and
padded batches, with Mamba parameters moved well off their init (as training leaves them).

The kernel tests check each op on random inputs of moderate size; this one checks that the ops
compose into the model a user loads: on the H200, a distilled SmolLM2 hybrid evaluated in bf16
gave perplexity NaN on held-out text, which no single-op test had shown.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mambaify import convert, ops

# On the chunk_simple_gla tests' xdist worker (see tests/test_triton_ops.py): fla autotunes once per process.
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("fla-simple_gla-64x64"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# SmolLM2-135M's widths (hidden 576, 9 query and 3 key/value heads of 64), four layers, a small vocabulary.
SMOLLM2_WIDTHS = dict(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=0)


def trained_like_hybrid(seed: int = 0):
    """A 50% hybrid converted with the linear-attention init, then with dt, A, conv and D spread
    over the ranges distillation reaches (dt 0.002..3, A -0.1..-8)."""
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_WIDTHS)).eval()
    model = convert(teacher, attention=0.5, init="linear-attention", seed=seed).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_attention:
                continue
            m = layer.mamba
            m.dt_bias.copy_(torch.empty(m.dt_bias.shape).uniform_(-6, 3, generator=g))
            m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(-2.3, 2.1, generator=g))
            m.conv1d.weight.normal_(0, 0.3, generator=g)
            m.D.normal_(1, 0.3, generator=g)
            m.out_proj.weight.mul_(5.0)  # the init's 0.1 W_O back towards the attention's scale
    return model


def padded_batch(lengths: list[int], side: str, vocab: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[r, cols] = torch.randint(1, vocab, (n,), generator=g)
        mask[r, cols] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model_and_reference():
    model = trained_like_hybrid()
    batches = {side: padded_batch([1100, 333, 17], side, model.config.vocab_size) for side in ("right", "left")}
    with torch.no_grad():
        reference = {side: model(input_ids=ids, attention_mask=mask).logits for side, (ids, mask) in batches.items()}
    return model, batches, reference


@pytest.mark.parametrize("backend", ["auto", "chunked"], ids=["fla", "reference-scan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cuda_forward_equals_cpu_float32(model_and_reference, monkeypatch, backend, dtype, side):
    model, batches, reference = model_and_reference
    if backend != "auto":  # the PyTorch scan on CUDA: tells a fla fault from one elsewhere
        monkeypatch.setenv("MAMBAIFY_SSD_BACKEND", backend)
    elif ops.select_backend(torch.device("cuda")) != "fla":
        pytest.skip("fla is not installed: 'auto' is the reference scan")
    ids, mask = batches[side]
    cuda_model = copy.deepcopy(model).to("cuda", dtype)
    with torch.no_grad():
        logits = cuda_model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    valid = mask.bool()
    got, want = logits[valid], reference[side][valid]
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).any(-1).sum())} positions not finite"
    rel = float((got - want).norm() / want.norm())
    assert rel < (2e-2 if dtype == torch.float32 else 8e-2), rel
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree > (0.98 if dtype == torch.float32 else 0.9), agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_transformers_generate_agrees_with_the_forward(dtype):
    """transformers' generate (the HybridCache path the evaluation and pseudo-labelling use) picks,
    at every step, the token the full forward over the text so far ranks first (up to near-ties)."""
    model = trained_like_hybrid().to("cuda", dtype)
    ids, mask = padded_batch([40, 23], "left", model.config.vocab_size, seed=5)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
        logits = model(input_ids=out, attention_mask=full_mask).logits.float()
    start = ids.shape[1]
    picked = out[:, start:]
    ranked = logits[:, start - 1:-1]
    top2 = ranked.topk(2, dim=-1).values
    chosen = ranked.gather(-1, picked[..., None])[..., 0]
    # A token the forward does not rank first must be a near-tie with its first.
    slack = 1e-3 if dtype == torch.float32 else 0.1
    assert ((top2[..., 0] - chosen) <= slack).all(), (top2[..., 0] - chosen).max().item()


def test_cuda_engine_graphed_prefill_through_fla_equals_the_eager_engine():
    """The Engine at SmolLM2's widths, where the Mamba layers' prefill runs fla's kernels: short
    prompts padded and prefilled from a CUDA graph (both models' prefills, for the speculative
    engine) give the tokens of the same engine run eagerly on the same padded prompts, in
    float32; and those of the plain engine fed the prompts as they are, up to near-ties."""
    from mambaify.generate.engine import PREFILL_GRAPH_WIDTHS, Engine
    from mambaify.generate.speculative_engine import SpeculativeEngine

    if ops.select_backend(torch.device("cuda")) != "fla":
        pytest.skip("fla is not installed: the prefill would not run its kernels")
    model = trained_like_hybrid().cuda()
    ids, mask = padded_batch([40, 23, 9], "left", model.config.vocab_size, seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    options = dict(max_new_tokens=24, stop_token_ids=[])
    graphed = Engine(model, max_batch_size=3, max_length=128)
    eager = Engine(model, max_batch_size=3, max_length=128, use_cuda_graph=False)
    eager.prefill_widths = PREFILL_GRAPH_WIDTHS  # the same padding, prefilled eagerly
    tokens = graphed.generate(ids, mask, **options)
    assert graphed.prefill_error is None and set(graphed._prefill_graphs) == {(3, 64)}
    assert torch.equal(tokens, eager.generate(ids, mask, **options))
    eager.prefill_widths = None  # the prompts as they are: other fla chunk boundaries
    assert (tokens == eager.generate(ids, mask, **options)).float().mean() > 0.9
    # The speculative engine (the target as its own draft): one graph for both models' prefills.
    spec = SpeculativeEngine(model, model, k=3, max_batch_size=3, max_length=128)
    spec_eager = SpeculativeEngine(model, model, k=3, max_batch_size=3, max_length=128, use_cuda_graph=False)
    spec_eager.prefill_widths = PREFILL_GRAPH_WIDTHS
    assert torch.equal(spec.generate(ids, mask, **options), spec_eager.generate(ids, mask, **options))
    assert spec.prefill_error is None and set(spec._prefill_graphs) == {(3, 64)}
