"""Conversion: layer placement, the Q/K/V/O mapping, and exactness when nothing is converted."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import mambaify
from mambaify import attention_layers_for, convert
from mambaify.convert import UnsupportedArchitectureError
from tests.conftest import tiny_teacher


def test_placement_matches_the_paper_for_32_layers():
    assert attention_layers_for(32, 1.0) == list(range(32))
    assert attention_layers_for(32, 0.5) == list(range(1, 32, 2))
    assert attention_layers_for(32, 0.25) == list(range(3, 32, 4))
    assert attention_layers_for(32, 0.125) == [7, 15, 23, 31]
    assert attention_layers_for(32, 0.0) == []


def test_placement_other_depths_keeps_the_last_layer():
    assert attention_layers_for(30, 0.5) == list(range(1, 30, 2))
    assert attention_layers_for(30, 0.25) == [1, 5, 9, 13, 17, 21, 25, 29]
    uneven = attention_layers_for(30, 0.3)
    assert len(uneven) == 9 and uneven[-1] == 29
    assert attention_layers_for(8, [5, 0, 2]) == [0, 2, 5]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_placement_rejects_fractions_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attention_layers_for(8, bad)


def test_placement_rejects_bad_indices():
    with pytest.raises(ValueError, match="out of range"):
        attention_layers_for(4, [0, 4])
    with pytest.raises(ValueError, match="repeat"):
        attention_layers_for(4, [1, 1])


def test_all_attention_equals_teacher_exactly(family):
    teacher = tiny_teacher(family)
    hybrid = convert(teacher, attention=1.0)
    ids = torch.randint(3, 97, (2, 19))
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, teacher(ids).logits)


def test_kept_layers_are_the_teachers_modules_bit_for_bit(family):
    teacher = tiny_teacher(family)
    hybrid = convert(teacher, attention=0.5)
    t_state, h_state = teacher.state_dict(), hybrid.state_dict()
    for i in hybrid.config.attn_layers:
        for name, tensor in t_state.items():
            if name.startswith(f"model.layers.{i}."):
                assert torch.equal(h_state[name], tensor), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(h_state[name], t_state[name])


def test_projection_slices_equal_teacher_qkvo(family):
    teacher = tiny_teacher(family)
    hybrid = convert(teacher, attention=0.5)
    assert hybrid.config.mamba_layers == [0, 2]
    for i in hybrid.config.mamba_layers:
        attn = teacher.model.layers[i].self_attn
        mixer = hybrid.model.layers[i].mamba
        rows = mixer.in_proj_slices
        w = mixer.in_proj.weight
        assert torch.equal(w[rows["C"]], attn.q_proj.weight)
        assert torch.equal(w[rows["B"]], attn.k_proj.weight)
        assert torch.equal(w[rows["x"]], attn.v_proj.weight)
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        if attn.q_proj.bias is not None:
            b = mixer.in_proj.bias
            assert torch.equal(b[rows["C"]], attn.q_proj.bias)
            assert torch.equal(b[rows["B"]], attn.k_proj.bias)
            assert torch.equal(b[rows["x"]], attn.v_proj.bias)
            assert torch.equal(b[rows["z"]], torch.zeros_like(b[rows["z"]]))
        # the MLP and norms of a converted layer are the teacher's too
        assert torch.equal(hybrid.model.layers[i].mlp.down_proj.weight, teacher.model.layers[i].mlp.down_proj.weight)


def test_new_parameters_follow_the_paper_init():
    hybrid = convert(tiny_teacher("llama", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2), 0.0)
    for layer in hybrid.model.layers:
        m = layer.mamba
        A = torch.exp(m.A_log)
        assert ((A >= 1) & (A <= 16)).all()
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
        assert torch.equal(m.D, torch.ones_like(m.D))


def test_mapping_behaves_as_causal_linear_attention(family):
    """With decay 1 (A = 0), dt = 1, D = 0 and conv, gate and norm bypassed, a converted layer's
    SSD core is causal linear attention over the teacher's own q, k, v (no RoPE, no softmax)."""
    teacher = tiny_teacher(family, dtype=torch.float64)
    hybrid = convert(teacher, attention=0.0)
    layer = 1
    attn = teacher.model.layers[layer].self_attn
    mixer = hybrid.model.layers[layer].mamba
    h = torch.randn(2, 11, 64, dtype=torch.float64)

    _, xBC, _ = mixer.project(h)  # conv and its activation bypassed
    x, B, C = mixer.split_heads(xBC)
    b, t = h.shape[:2]
    heads = mixer.num_heads
    y, _ = mambaify.ops.ssd_scan(
        x, torch.ones(b, t, heads, dtype=h.dtype), torch.zeros(heads, dtype=h.dtype), B, C, chunk_size=4
    )

    hd, kv = attn.head_dim, teacher.config.num_key_value_heads
    q = attn.q_proj(h).view(b, t, heads, hd)
    k = attn.k_proj(h).view(b, t, kv, hd).repeat_interleave(heads // kv, dim=2)
    v = attn.v_proj(h).view(b, t, kv, hd).repeat_interleave(heads // kv, dim=2)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.einsum("bihd,bjhd->bhij", q, k).masked_fill(~mask, 0)
    expected = torch.einsum("bhij,bjhd->bihd", scores, v)
    assert (y - expected).abs().max() / expected.abs().max() < 1e-12


def test_progressive_conversion_inits_from_the_hybrids_attention():
    teacher = tiny_teacher("llama")
    half = convert(teacher, attention=0.5)  # attention at 1, 3
    with torch.no_grad():  # make the hybrid's attention differ from the teacher's (as training would)
        for p in half.model.layers[1].self_attn.parameters():
            p.add_(0.5)
    quarter = convert(half, attention=0.25)  # attention at 3 only
    assert quarter.config.attn_layers == [3]
    new = quarter.model.layers[1].mamba
    rows = new.in_proj_slices
    assert torch.equal(new.in_proj.weight[rows["C"]], half.model.layers[1].self_attn.q_proj.weight)
    # already-Mamba layers are carried over unchanged
    for name, p in half.model.layers[0].mamba.named_parameters():
        assert torch.equal(dict(quarter.model.layers[0].mamba.named_parameters())[name], p)
    with pytest.raises(ValueError, match="cannot become attention again"):
        convert(quarter, attention=[0, 3])


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2"):
        convert(gpt2, 0.5)
