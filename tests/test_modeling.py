"""The hybrid as a transformers model: save/load, cache, generate, padding and packing."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mambaify import HybridCache, HybridConfig, HybridForCausalLM, convert
from tests.conftest import tiny_teacher


@pytest.fixture(params=[0.5, 0.0], ids=["half-attention", "no-attention"])
def hybrid(request):
    model = convert(tiny_teacher("llama"), attention=request.param)
    torch.manual_seed(1)
    with torch.no_grad():  # move the gates and conv off their init so every path matters
        for layer in model.model.layers:
            if not layer.is_attention:
                layer.mamba.conv1d.weight.normal_(0, 0.3)
                layer.mamba.D.normal_(1, 0.3)
    return model


def test_save_then_auto_load_without_the_teacher(tmp_path, hybrid):
    hybrid.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mambaify_hybrid" and "attn_layers" in config
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HybridConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HybridForCausalLM)
    ids = torch.randint(3, 97, (2, 23))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hybrid(ids).logits)


def test_hybrid_config_round_trip_keeps_teacher_fields():
    teacher = tiny_teacher("qwen2")
    hybrid = convert(teacher, attention=[1, 3])
    base = hybrid.config.to_base_config()
    assert type(base) is type(teacher.config)
    for key in ("hidden_size", "num_key_value_heads", "rope_parameters", "layer_types", "vocab_size"):
        assert getattr(base, key) == getattr(teacher.config, key), key
    with pytest.raises(Exception, match="out of range"):  # transformers wraps it in its validation error
        HybridConfig(num_hidden_layers=2, attn_layers=[2])


def greedy_by_recomputing(model, ids, mask, steps, eos=2, pad=0):
    """Greedy decoding with no cache: the whole sequence is run again for every new token.
    A row that has emitted eos continues with pad, as generate() does."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, pad)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    return ids


def test_cached_generate_equals_recomputation_batch1(hybrid):
    ids = torch.randint(3, 97, (1, 9))
    out = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ref = greedy_by_recomputing(hybrid, ids, torch.ones_like(ids), 12)
    assert torch.equal(out, ref)


def left_padded(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_left_padded_batch_generation(hybrid):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (7, 2, 12)]
    ids, mask = left_padded(prompts)
    out = hybrid.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputing(hybrid, ids, mask, 10))
    # Padding must not leak into the SSM or conv state: each row equals its prompt run alone.
    for i, p in enumerate(prompts):
        alone = torch.tensor([p])
        single = hybrid.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=10, do_sample=False)
        new_tokens = single[0, len(p):].tolist()
        assert out[i, ids.shape[1]:ids.shape[1] + len(new_tokens)].tolist() == new_tokens


def test_padding_does_not_change_the_logits_of_real_tokens(hybrid):
    ids, mask = left_padded([[5, 6, 7, 8, 9], [11, 12]])
    with torch.no_grad():
        logits = hybrid(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        alone = hybrid(torch.tensor([[11, 12]])).logits
    assert torch.allclose(logits[1, -2:], alone[0], atol=1e-5)


def test_sampling_batch_runs_and_is_seeded(hybrid):
    ids, mask = left_padded([[5, 6, 7], [9]])
    torch.manual_seed(0)
    a = hybrid.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    b = hybrid.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert a.shape == (2, 9) and torch.equal(a, b)


def test_cache_counts_tokens_without_attention_layers():
    hybrid = convert(tiny_teacher("llama"), attention=0.0)
    cache = HybridCache(hybrid.config.layer_kinds)
    with torch.no_grad():
        hybrid(torch.randint(3, 97, (1, 5)), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 5


def test_packed_row_equals_documents_run_one_by_one(hybrid):
    docs = [torch.randint(3, 97, (n,)) for n in (6, 9, 4)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        logits = hybrid(packed, position_ids=position_ids, use_cache=False).logits[0]
        separate = torch.cat([hybrid(d[None], use_cache=False).logits[0] for d in docs])
    assert torch.allclose(logits, separate, atol=1e-5)
