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


def _mixer_reference(mixer, attn, h, dt, A, out_scale):
    """What a linear-attention-initialised mixer must compute, written from the teacher's
    projections: y_t = sum_{s<=t} dt exp(-dt A (t-s)) (silu(q_t) . silu(k_s)) silu(v_s), then
    out_scale * W_O (norm weight * RMSNorm(y * silu(z)))."""
    b, t, _ = h.shape
    heads, hd = mixer.num_heads, attn.head_dim
    rep = heads // mixer.num_xb_heads
    silu = torch.nn.functional.silu
    q = silu(attn.q_proj(h)).view(b, t, heads, hd)
    k = silu(attn.k_proj(h)).view(b, t, -1, hd).repeat_interleave(rep, dim=2)
    v = silu(attn.v_proj(h)).view(b, t, -1, hd).repeat_interleave(rep, dim=2)
    pos = torch.arange(t, dtype=h.dtype)
    decay = torch.exp(-dt * A * (pos[:, None] - pos[None, :])).tril()  # (t, s), 0 above the diagonal
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * decay * dt
    y = torch.einsum("bhij,bjhd->bihd", scores, v).reshape(b, t, -1)
    z = mixer.in_proj(h)[..., mixer.in_proj_slices["z"]]
    g = y * silu(z)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    out = (mixer.norm.weight * g) @ attn.o_proj.weight.T * out_scale
    if attn.o_proj.bias is not None:
        out = out + out_scale * attn.o_proj.bias
    return out


def test_linear_attention_init_sets_the_documented_values(family):
    from mambaify.convert import LINEAR_ATTENTION_A, LINEAR_ATTENTION_DT, LINEAR_ATTENTION_OUT_SCALE

    teacher = tiny_teacher(family)
    paper = convert(teacher, attention=0.5, seed=3)
    hybrid = convert(teacher, attention=0.5, seed=3, init="linear-attention")
    assert hybrid.config.to_dict() == paper.config.to_dict()  # same architecture: no new parameters
    p_state, h_state = paper.state_dict(), hybrid.state_dict()
    assert p_state.keys() == h_state.keys()
    for name, tensor in p_state.items():  # everything outside the converted mixers is as the paper's
        if ".mamba." not in name:
            assert torch.equal(h_state[name], tensor), name
    for i in hybrid.config.mamba_layers:
        attn, mixer = teacher.model.layers[i].self_attn, hybrid.model.layers[i].mamba
        rows, w = mixer.in_proj_slices, mixer.in_proj.weight
        assert torch.equal(w[rows["C"]], attn.q_proj.weight)
        assert torch.equal(w[rows["B"]], attn.k_proj.weight)
        assert torch.equal(w[rows["x"]], attn.v_proj.weight)
        assert torch.equal(w[rows["z"]], paper.model.layers[i].mamba.in_proj.weight[rows["z"]])  # the seeded draw
        assert torch.equal(w[rows["dt"]], torch.zeros_like(w[rows["dt"]]))
        if mixer.in_proj.bias is not None:
            assert torch.equal(mixer.in_proj.bias[rows["C"]], attn.q_proj.bias)
            assert torch.equal(mixer.in_proj.bias[rows["dt"]], torch.zeros(mixer.num_heads))
        taps = torch.zeros_like(mixer.conv1d.weight)
        taps[:, 0, -1] = 1
        assert torch.equal(mixer.conv1d.weight, taps)
        assert torch.equal(mixer.conv1d.bias, torch.zeros_like(mixer.conv1d.bias))
        dt = torch.nn.functional.softplus(mixer.dt_bias.double())
        assert torch.allclose(dt, torch.full_like(dt, LINEAR_ATTENTION_DT), rtol=1e-6)
        assert torch.allclose(torch.exp(mixer.A_log), torch.full_like(mixer.A_log, LINEAR_ATTENTION_A))
        assert torch.equal(mixer.D, torch.zeros_like(mixer.D))
        assert torch.equal(mixer.out_proj.weight, LINEAR_ATTENTION_OUT_SCALE * attn.o_proj.weight)


def test_linear_attention_init_computes_normalised_linear_attention(family):
    from mambaify.convert import LINEAR_ATTENTION_A, LINEAR_ATTENTION_DT, LINEAR_ATTENTION_OUT_SCALE

    teacher = tiny_teacher(family, dtype=torch.float64)
    hybrid = convert(teacher, attention=0.0, init="linear-attention")
    h = torch.randn(2, 13, 64, dtype=torch.float64)
    for layer in (0, 2):
        mixer, attn = hybrid.model.layers[layer].mamba, teacher.model.layers[layer].self_attn
        with torch.no_grad():
            got = mixer(h)
            expected = _mixer_reference(mixer, attn, h, LINEAR_ATTENTION_DT, LINEAR_ATTENTION_A, LINEAR_ATTENTION_OUT_SCALE)
        assert (got - expected).abs().max() / expected.abs().max() < 1e-10


def test_linear_attention_init_round_trips_through_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    hybrid = convert(tiny_teacher("llama"), attention=0.5, init="linear-attention")
    hybrid.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hybrid(ids).logits)


def test_init_applies_only_to_newly_converted_layers():
    teacher = tiny_teacher("llama")
    half = convert(teacher, attention=0.5)  # paper init at 0, 2
    quarter = convert(half, attention=0.25, init="linear-attention")  # converts 1 as well
    for name, p in half.model.layers[0].mamba.named_parameters():
        assert torch.equal(dict(quarter.model.layers[0].mamba.named_parameters())[name], p)
    new = quarter.model.layers[1].mamba
    assert torch.equal(new.D, torch.zeros_like(new.D))
    assert torch.equal(new.out_proj.weight, 0.1 * half.model.layers[1].self_attn.o_proj.weight)


@pytest.mark.parametrize("bad", ["Paper", "identity", ""])
def test_unknown_init_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="'paper', 'linear-attention'"):
        convert(tiny_teacher("llama"), 0.5, init=bad)


# `--init` through the command line and the distillation config (tiny teacher_dir / data_files).


def test_cli_convert_init_reaches_the_weights(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from mambaify.cli import main as cli_main

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for init, scale in (("paper", 1.0), ("linear-attention", 0.1)):
        assert cli_main(["convert", str(teacher_dir), str(tmp_path / init), "--attention", "1,", "--init", init]) == 0
        mixer = AutoModelForCausalLM.from_pretrained(tmp_path / init).model.layers[0].mamba
        assert torch.equal(mixer.out_proj.weight, scale * teacher.model.layers[0].self_attn.o_proj.weight)
        assert torch.equal(mixer.D, torch.full_like(mixer.D, 1.0 if init == "paper" else 0.0))


@pytest.mark.parametrize("command", ["convert", "distill"])
def test_cli_bad_init_is_one_line_naming_the_choices(teacher_dir, data_files, tmp_path, capsys, command):
    from mambaify.cli import main as cli_main

    out = tmp_path / "out"
    argv = {"convert": ["convert", str(teacher_dir), str(out)],
            "distill": ["distill", "--teacher", str(teacher_dir), "--data", str(data_files[0]), "--out", str(out)]}
    capsys.readouterr()
    assert cli_main([*argv[command], "--init", "identity-conv"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "'identity-conv'" in err[0] and "'paper', 'linear-attention'" in err[0], err
    assert not out.exists()


def test_distill_init_reaches_convert_from_cli_and_yaml(teacher_dir, data_files, tmp_path, monkeypatch):
    import mambaify.distill.trainer as trainer
    from mambaify.cli import main as cli_main
    from mambaify.distill.trainer import DistillConfig

    seen = []
    real_convert = trainer.convert

    def recording_convert(*args, **kwargs):
        seen.append(kwargs.get("init"))
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(trainer, "convert", recording_convert)
    run_dir = tmp_path / "run"
    code = cli_main(["distill", "--teacher", str(teacher_dir), "--data", str(data_files[0]), "--out", str(run_dir),
                     "--init", "paper", "--tokens", "128", "--seq-len", "64", "--batch-size", "2",
                     "--time-budget-s", "600", "--device", "cpu", "--no-progress"])
    assert code == 0 and seen == ["paper"]  # the flag overrides distill's default
    assert "init: paper" in (run_dir / "config.yaml").read_text()
    assert DistillConfig.from_yaml(run_dir / "config.yaml").time_budget_s == 600
    assert DistillConfig.from_yaml(run_dir / "config.yaml").init == "paper"
    assert DistillConfig().init == "linear-attention"
    with pytest.raises(ValueError, match="--init: unknown init 'Paper'"):
        DistillConfig(init="Paper").validate()
