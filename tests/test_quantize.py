"""Int8 drafts: the quantized linear layer against its dequantized product, and speculative
decoding with an int8 draft giving exactly the target's greedy tokens through every linear path."""

import copy

import pytest
import torch
from torch import nn

import mambaify
from mambaify.generate.quantize import Int8Linear, is_quantized, quantize_int8
from mambaify.generate.speculative_engine import SpeculativeEngine
from tests.test_speculative_engine import _prompts, bigram_teacher, plain_greedy, without_eos


def test_int8_linear_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=True, dtype=torch.float64)
    with torch.no_grad():
        linear.weight[3] = 0.0  # a row of zeros stays zeros
        linear.weight[5] *= 100.0  # a row far larger than the others keeps its own scale
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad and q.weight_scale.shape == (24,)
    dequantized = q.weight.double() * q.weight_scale[:, None]
    # Round to nearest: every weight within half its row's step; the row's largest exactly +-127 steps.
    assert ((dequantized - linear.weight).abs() <= q.weight_scale[:, None] / 2 + 1e-12).all()
    assert torch.equal(q.weight.abs().amax(1)[[0, 5]], torch.tensor([127, 127], dtype=torch.int8))
    assert not dequantized[3].any()
    x = torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(q(x), x @ dequantized.T + linear.bias, rtol=1e-12, atol=1e-12)
    q.to(torch.bfloat16)  # the scales and the bias follow the model's dtype, the integers stay
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == q.bias.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def pair():
    target = without_eos(mambaify.convert(bigram_teacher(0), attention=0.5).eval())
    drafts = {"transformer": bigram_teacher(2, num_hidden_layers=2),
              "mamba2": mambaify.convert(bigram_teacher(3, num_hidden_layers=2), attention=0.0).eval()}
    return target, drafts


def test_quantize_int8_takes_every_decoder_linear_and_leaves_the_head(pair):
    _, drafts = pair
    for draft in drafts.values():
        q = quantize_int8(copy.deepcopy(draft))
        linears = [name for name, m in draft.model.layers.named_modules() if type(m) is nn.Linear]
        assert linears and all(isinstance(q.model.layers.get_submodule(n), Int8Linear) for n in linears)
        assert type(q.lm_head) is nn.Linear and is_quantized(q) and not is_quantized(draft)
    with pytest.raises(ValueError, match="no decoder layers"):
        quantize_int8(nn.Linear(4, 4))


@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
@pytest.mark.parametrize("linear_path", ["modules", "small-batch-folded"])
def test_an_int8_draft_keeps_greedy_exact_and_mostly_agrees(pair, draft_name, linear_path):
    """Whatever the draft computes, the target's verification keeps its greedy tokens; the int8
    draft's proposals are accepted about as often as the float draft's."""
    target, drafts = pair
    draft = drafts[draft_name]
    quantized = quantize_int8(copy.deepcopy(draft))
    options = dict(k=3, max_batch_size=4, max_length=40)
    if linear_path == "small-batch-folded":  # the engines' CUDA path (its PyTorch form here), scales and all,
        options.update(small_batch_linear=True, fold_norms=True, draft_vocab=range(0, 97, 2))  # a cut head too
    ids, mask = _prompts(4)
    for batch in (4, 1):  # batch 1: the draft's one-row steps, their norms folded into the int8 GEMVs
        expected = plain_greedy(target, ids[:batch], mask[:batch], 12)
        accepted = {}
        for name, model in (("float", draft), ("int8", quantized)):
            engine = SpeculativeEngine(target, model, **options)
            for k in (1, 3, 5):
                tokens = engine.generate(ids[:batch], mask[:batch], max_new_tokens=12, stop_token_ids=[], k=k)
                assert torch.equal(tokens, expected), (name, batch, k)
            accepted[name] = engine.stats.mean_accepted
        assert accepted["int8"] >= 0.8 * accepted["float"] > 0, accepted


def test_compiled_rounds_with_an_int8_draft_equal_eager(pair):
    """The rounds compiled with the scales as operands of the small-batch custom ops (one graph
    each, their fakes giving the shapes) give the eager rounds' tokens, which are the target's."""
    target, drafts = pair
    draft = quantize_int8(copy.deepcopy(drafts["transformer"]))
    options = dict(k=2, max_batch_size=3, max_length=40, small_batch_linear=True, fold_norms=True)
    compiled = SpeculativeEngine(target, draft, compile=True, **options)
    eager = SpeculativeEngine(target, draft, **options)
    ids, mask = _prompts(2)
    greedy = dict(max_new_tokens=12, stop_token_ids=[])
    tokens = compiled.generate(ids, mask, **greedy)
    assert compiled.is_compiled(2, 2) and compiled.compile_error is None
    assert torch.equal(tokens, eager.generate(ids, mask, **greedy))
    assert torch.equal(tokens, plain_greedy(target, ids, mask, 12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
@pytest.mark.parametrize("compile", [False, True], ids=["graphed", "compiled"])
def test_cuda_int8_draft_rounds_equal_plain_greedy(pair, draft_name, compile):
    """The int8 draft's steps through the split-K GEMV's int8 path (norms and residual adds
    folded in, CUDA graphs, compiled): the target's plain greedy tokens (float32), its
    proposals accepted about as often as the float draft's."""
    target, drafts = pair
    target = copy.deepcopy(target).cuda()
    ids, mask = (t.cuda() for t in _prompts(4))
    expected = {batch: plain_greedy(target, ids[:batch], mask[:batch], 16).cpu() for batch in (4, 1)}
    accepted = {}
    for name in ("float", "int8"):
        draft = copy.deepcopy(drafts[draft_name]).cuda()
        if name == "int8":
            quantize_int8(draft)
        engine = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=48, small_batch_linear=True,
                                   fold_norms=True, compile=compile)
        for batch in (4, 1):
            tokens = engine.generate(ids[:batch], mask[:batch], max_new_tokens=16, stop_token_ids=[])
            assert torch.equal(tokens.cpu(), expected[batch]), (name, batch)
        accepted[name] = engine.stats.mean_accepted
    assert accepted["int8"] >= 0.8 * accepted["float"] > 0, accepted


def test_agreement_script_scores_the_int8_draft_against_its_float_self_and_the_target(teacher_dir, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    from mambaify.draft import build_draft_from_teacher
    from mambaify.teachers import load_teacher

    teacher, tokenizer = load_teacher(str(teacher_dir))
    draft = build_draft_from_teacher(teacher)
    draft.save_pretrained(tmp_path / "draft")
    tokenizer.save_pretrained(tmp_path / "draft")
    path = Path(__file__).parents[1] / "benchmarks" / "draft_int8_agreement.py"
    spec = importlib.util.spec_from_file_location("draft_int8_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--target", str(teacher_dir), "--draft", str(tmp_path / "draft"), "--texts", "2",
                        "--tokens", "24", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert result["positions"] == 48 and 0.5 < result["int8_same_top1"] <= 1 and result["kl_float_int8"] >= 0
    # The tiny teacher's two layers are the draft's two: the float draft is the target itself.
    assert result["top1_with_target_float"] == 1.0 and result["top1_with_target_int8"] > 0.5
    # --int8-head: the LM head quantized too, said in the result.
    assert script.main(["--target", str(teacher_dir), "--draft", str(tmp_path / "draft"), "--texts", "2",
                        "--tokens", "24", "--int8-head", "--out", str(tmp_path / "head")]) == 0
    head = json.loads((tmp_path / "head" / "agreement.json").read_text())
    assert head["int8_head"] is True and not result["int8_head"] and 0.5 < head["int8_same_top1"] <= 1
