"""The speculative engine (static caches, CUDA-graph rounds) against plain greedy decoding, against
from-scratch forward passes (the target's and the draft's states after rounds of any outcome),
and against the target's distribution when sampling; plus its entry points (model.generate with
an assistant, the CLI) and the benchmark script on tiny models."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import mambaify
from mambaify import ops
from mambaify.cli import main as cli_main
from mambaify.generate import engine as engine_module
from mambaify.generate import speculative_engine as spec
from mambaify.generate import quantize
from mambaify.generate.engine import Engine
from mambaify.models.modeling import GatedRMSNorm
from mambaify.ops.attention import decode_attention_op
from mambaify.ops.reference import slide_conv_window, ssd_fold
from mambaify.generate.speculative_engine import (
    AdaptiveK,
    MambaVerifyBuffers,
    RoundTimes,
    SpeculativeEngine,
    parse_k,
)
from tests._tiny_data import tiny_tokenizer
from tests.conftest import run_compiled_and_eager, tiny_teacher
from tests.test_speculative import SMALL, V, _chi_square, _exact_two_tokens, _full_forward, _prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine are much slower with 2 threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Models whose drafts agree with their targets often, but not always


def bigram_teacher(seed: int, num_hidden_layers: int = 4, embedding_scale: float = 0.12):
    """A tiny Llama whose embeddings and head follow one random bigram table for every seed
    (the head maps token a's embedding to token perm[a]), and whose random layers perturb that
    table. Two such models agree on most next tokens but not all, so rounds accept 1-3 of 4
    drafts, differently per row (random tiny models agree on almost nothing)."""
    model = tiny_teacher("llama", seed=seed, num_hidden_layers=num_hidden_layers)
    g = torch.Generator().manual_seed(123)
    vocab, width = model.config.vocab_size, model.config.hidden_size
    perm = torch.randperm(vocab, generator=g)
    table = torch.randn(vocab, width, generator=g)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embedding_scale * table)
        model.lm_head.weight.copy_(table[perm] / width**0.5)
    return model


def without_eos(model):
    model.generation_config.eos_token_id = None  # compare fixed lengths
    return model


@pytest.fixture(scope="module")
def targets():
    teacher = bigram_teacher(0)
    return {
        "hybrid50": without_eos(mambaify.convert(teacher, attention=0.5).eval()),
        "mamba2": without_eos(mambaify.convert(teacher, attention=0.0).eval()),
    }


@pytest.fixture(scope="module")
def drafts():
    return {
        "transformer": bigram_teacher(2, num_hidden_layers=2),
        "mamba2": mambaify.convert(bigram_teacher(3, num_hidden_layers=2), attention=0.0).eval(),
    }


class ConstantHead(nn.Module):
    """An LM head whose argmax is always ``token``."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, 1))
        self.token = token

    def forward(self, hidden):
        logits = hidden.new_zeros(*hidden.shape[:-1], self.weight.shape[0])
        logits[..., self.token] = 1.0
        return logits


def rejecting_draft(token: int):
    """A draft that always proposes ``token`` (greedy): every round rejects if the target never
    picks it."""
    draft = tiny_teacher("llama", seed=4, num_hidden_layers=2)
    draft.lm_head = ConstantHead(draft.config.vocab_size, token)
    return draft


_engines: dict = {}


def engine_for(target, draft, **options) -> SpeculativeEngine:
    """Engines are reused across tests (one per target, draft and options)."""
    key = (id(target), id(draft), tuple(sorted(options.items())))
    if key not in _engines:
        _engines[key] = SpeculativeEngine(target, draft, **{"max_batch_size": 4, "max_length": 40, **options})
    return _engines[key]


def plain_greedy(target, ids, mask, new):
    with torch.no_grad():
        out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


# ---------------------------------------------------------------------------------------------
# Greedy: token for token the target's own greedy decoding


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_plain_greedy(targets, drafts, target_name, draft_name, batch):
    target, draft = targets[target_name], drafts[draft_name]
    ids, mask = _prompts(batch)
    new = 12
    expected = plain_greedy(target, ids, mask, new)
    engine = engine_for(target, draft, k="auto")
    accepted = set()
    for k in [1, 2, 3, 4, 5, 6, "auto"]:
        tokens = engine.generate(ids, mask, max_new_tokens=new, stop_token_ids=[], k=k)
        assert torch.equal(tokens, expected), f"k={k}"
        stats = engine.stats
        assert stats.emitted == batch * new
        assert 0 <= stats.mean_accepted <= (max(stats.k_used) if k == "auto" else k)
        assert stats.tokens_per_round >= 1
        accepted.add(round(stats.mean_accepted, 3))
    assert len(accepted) > 1 and max(accepted) > 0.5  # drafts were right sometimes, not always


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
def test_small_batch_linear_rounds_give_the_same_tokens(targets, drafts, target_name, draft_name, monkeypatch):
    """Both models' linear layers through ops.small_batch_linear (F.linear on the CPU, so the same
    tokens exactly): the verify round's and every draft step's projections, MLPs and heads."""
    target, draft = targets[target_name], drafts[draft_name]
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids, mask, 12)
    calls = []
    real, real_gated = ops.small_batch_linear, ops.small_batch_gated_up
    monkeypatch.setattr(ops, "small_batch_linear", lambda x, w, b=None: calls.append(x.shape[:-1]) or real(x, w, b))
    monkeypatch.setattr(ops, "small_batch_gated_up", lambda x, g, u: calls.append(x.shape[:-1]) or real_gated(x, g, u))
    engine = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=40, small_batch_linear=True,
                               fold_norms=False)
    assert engine.small_batch_linear
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=12, stop_token_ids=[]), expected)
    # Verify calls (4 rows x K + 1 = 4 tokens) and draft steps (4 rows x 2, then 1 token) went through them.
    assert {(4, 4), (4, 2), (4, 1)} <= set(calls)


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
@pytest.mark.parametrize("prepared_norms", [False, True], ids=["norms-as-kernels", "norms-prepared"])
def test_fold_norms_rounds_give_the_same_tokens_and_run_no_norm_module(targets, drafts, target_name, draft_name,
                                                                       prepared_norms, monkeypatch):
    """fold_norms: the verify calls' and draft steps' residual adds inside the projections before
    them, their RMSNorms inside the projections after them where a call has one row (the draft
    steps at batch 1) and run first otherwise (ops.folds_norm), or with MAMBAIFY_PREPARED_NORMS=1
    prepared by the residual-add GEMV before them there (the first layer's excepted); on the
    CPU computed as the modules do, so the same tokens exactly (prepared: to rounding, the same
    greedy tokens). No decoder-layer or final norm module runs in a round, and at batch 1
    neither does a draft step's gated Mamba norm."""
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "1" if prepared_norms else "0")
    target, draft = targets[target_name], drafts[draft_name]
    prepared = []  # the rows of each call that prepared a norm
    original = ops.small_batch_linear_prepare_norm

    def counted(*args, **kwargs):
        prepared.append(args[0].numel() // args[0].shape[-1])
        return original(*args, **kwargs)
    monkeypatch.setattr(ops, "small_batch_linear_prepare_norm", counted)
    for batch in (4, 1):
        ids, mask = _prompts(4)
        ids, mask = ids[:batch], mask[:batch]
        expected = plain_greedy(target, ids, mask, 12)
        engine = SpeculativeEngine(target, draft, k=3, max_batch_size=batch, max_length=40, small_batch_linear=True,
                                   fold_norms=True)
        for stack in (engine.target_stack, engine.draft_stack):
            assert stack.folded_norm is not None and all(r.folded_norms for r in stack.layers)
        prepared.clear()
        ran = {"layer": 0, "draft gated": 0}
        norms = [m for model in (target, draft) for m in model.modules() if type(m) is type(model.model.norm)]
        hooks = [m.register_forward_hook(lambda *_: ran.update(layer=ran["layer"] + 1)) for m in norms]
        hooks += [m.register_forward_hook(lambda module, args, out: ran.update(
                      {"draft gated": ran["draft gated"] + (args[0].numel() == args[0].shape[-1])}))
                  for m in draft.modules() if type(m) is GatedRMSNorm]
        try:
            tokens = engine.generate(ids, mask, max_new_tokens=12, stop_token_ids=[])
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(tokens, expected)
        # Each model's prefill runs its layer norms once, the rounds none; no one-row gated norm runs.
        assert ran == {"layer": len(norms), "draft gated": 0}
        # Prepared: by calls of several rows only (a verify call, the draft's first step), never one.
        assert (bool(prepared) and min(prepared) > 1) if prepared_norms else prepared == []


@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
def test_split_k_attention_path_gives_the_same_tokens(targets, drafts, draft_name, monkeypatch):
    """The CUDA branch of attention (ops.decode_attention fed slots and pad lengths, no mask),
    run here on its PyTorch path: same tokens, for a target and a draft with attention layers."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[4].shape)  # query_slots (b, t)
        return decode_attention_op(*args, **kwargs)

    monkeypatch.setattr(spec, "use_split_k_attention", lambda device: True)
    monkeypatch.setattr(spec, "decode_attention_op", counted)
    target = targets["hybrid50"]
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids, mask, 12)
    engine = SpeculativeEngine(target, drafts[draft_name], k=3, max_batch_size=4, max_length=40)
    for k in (1, 3, 6):
        assert torch.equal(engine.generate(ids, mask, max_new_tokens=12, stop_token_ids=[], k=k), expected), k
    assert (4, 7) in calls  # the target's verify over K + 1 = 7 tokens went through the split-K op


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
def test_naive_store_states_verify_gives_the_same_tokens(targets, drafts, target_name):
    """The benchmark's baseline (every per-token state stored, restart by a gather) decodes alike."""
    target = targets[target_name]
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids, mask, 12)
    engine = SpeculativeEngine(target, drafts["mamba2"], k=4, max_batch_size=4, max_length=32, store_states=True)
    for k in (1, 4):
        assert torch.equal(engine.generate(ids, mask, max_new_tokens=12, stop_token_ids=[], k=k), expected)


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
def test_random_target_with_random_and_identical_drafts(target_name):
    """A random tiny target (whose greedy path depends on every detail of its state) with a random
    draft (almost every round rejects) and with itself as the draft (every round accepts all)."""
    teacher = tiny_teacher("llama")
    target = without_eos(mambaify.convert(teacher, attention=0.5 if target_name == "hybrid50" else 0.0).eval())
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids, mask, 10)
    for draft in (tiny_teacher("llama", seed=1), target):
        engine = SpeculativeEngine(target, draft, k=6, max_batch_size=4, max_length=32)
        for k in (1, 3, 6):
            assert torch.equal(engine.generate(ids, mask, max_new_tokens=10, stop_token_ids=[], k=k), expected)
            if draft is target:
                assert engine.stats.mean_accepted == k


# ---------------------------------------------------------------------------------------------
# States after rounds: equal to what a from-scratch forward over the committed tokens reaches


def assert_state_equals_full_forward(model, stack, cache, committed: list[list[int]]):
    """Fold the cache's pending counts (with the reference replay) and compare every layer's state
    with a from-scratch forward over each row's committed tokens: the Mamba checkpoint and conv
    history, and the keys/values of the row's real slots."""
    _, full = _full_forward(model, committed)
    longest = max(len(r) for r in committed)
    lengths, pads = cache.lengths.tolist(), cache.pad_lengths.tolist()
    assert [n - p for n, p in zip(lengths, pads)] == [len(r) for r in committed]
    for i, (runner, buffers) in enumerate(zip(stack.layers, cache.layers)):
        if isinstance(buffers, MambaVerifyBuffers):
            mixer = runner.mixer.mixer
            checkpoint = ssd_fold(buffers.checkpoint, buffers.x, buffers.dt, buffers.B, cache.counts, mixer.A)
            history = slide_conv_window(buffers.window, cache.counts, mixer.d_conv)
            layer = full.layers[i]
            torch.testing.assert_close(checkpoint, layer.ssm_state, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(history, layer.conv_state.transpose(1, 2), atol=1e-5, rtol=1e-4)
        else:
            keys, values = full.layers[i].keys, full.layers[i].values
            for row, (n, p) in enumerate(zip(lengths, pads)):
                size = n - p
                torch.testing.assert_close(buffers.keys[row, :, p:n], keys[row, :, longest - size:], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(buffers.values[row, :, p:n], values[row, :, longest - size:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
@pytest.mark.parametrize("draft_kind", ["all-rejected", "all-accepted", "mixed-transformer", "mixed-mamba2"])
def test_rounds_leave_the_state_of_sequential_decoding(targets, drafts, target_name, draft_kind):
    target = targets[target_name]
    ids, mask = _prompts(4)
    k, new = 3, 9
    continuation = plain_greedy(target, ids, mask, new + k + 1).tolist()  # past the last commit
    if draft_kind == "all-rejected":
        unused = sorted(set(range(3, 97)) - {t for row in continuation for t in row})[0]
        draft = rejecting_draft(unused)
    elif draft_kind == "all-accepted":
        draft = target
    else:
        draft = drafts[draft_kind.split("-")[1]]
    engine = SpeculativeEngine(target, draft, k=k, max_batch_size=4, max_length=32)
    tokens = engine.generate(ids, mask, max_new_tokens=new, stop_token_ids=[])
    assert tokens.tolist() == [row[:new] for row in continuation]
    if draft_kind == "all-rejected":
        assert engine.stats.accepted == 0 and engine.stats.rounds == new
    if draft_kind == "all-accepted":
        assert engine.stats.mean_accepted == k and engine.stats.rounds == -(-new // (k + 1))
    # Row b committed its prompt and then its greedy continuation, up to its length.
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    pads = engine.target_cache.pad_lengths[:4]
    sizes = (engine.target_cache.lengths[:4] - pads).tolist()
    committed = [(p + c)[:n] for p, c, n in zip(prompts, continuation, sizes)]
    assert_state_equals_full_forward(target, engine.target_stack, engine.target_cache.rows(4), committed)
    # The draft is one token behind: it has committed every row's tokens but the newest (the next
    # round's first input, prev), behind one more pad column; its own full forward over those.
    assert torch.equal(engine.draft_cache.lengths[:4], engine.target_cache.lengths[:4])
    assert torch.equal(engine.draft_cache.pad_lengths[:4], pads + 1)
    assert engine.buffers.prev[:4].tolist() == [row[-1] for row in committed]
    assert_state_equals_full_forward(draft, engine.draft_stack, engine.draft_cache.rows(4), [r[:-1] for r in committed])


@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2", "hybrid50-small-embeddings"])
@pytest.mark.parametrize("draft_name", ["the target itself", "transformer", "mamba2"])
def test_one_token_prompts(targets, drafts, target_name, draft_name):
    """A one-token prompt gives the draft (one token behind the target) a pad as its first
    round's prev: masked as the prefill masks pads, it must leave no trace. With the target as
    its own draft, any trace would cost acceptance: every draft token must be accepted. (The
    small-embeddings target's tokens depend on its context, not only on the bigram table.)"""
    if target_name in targets:
        target = targets[target_name]
    else:
        teacher = bigram_teacher(0, num_hidden_layers=2, embedding_scale=0.06)
        target = without_eos(mambaify.convert(teacher, attention=0.5).eval())
    draft = target if draft_name == "the target itself" else drafts[draft_name]
    mixed = (torch.tensor([[0, 0, 0, 5], [0, 0, 7, 8], [9, 10, 11, 12]]),
             torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]))
    single = (torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.long))
    k, new = 3, 9
    for ids, mask in (mixed, single):
        engine = SpeculativeEngine(target, draft, k=k, max_batch_size=3, max_length=16)
        tokens = engine.generate(ids, mask, max_new_tokens=new, stop_token_ids=[])
        assert tokens.tolist() == plain_greedy(target, ids, mask, new).tolist()
        if draft is target:
            assert engine.stats.mean_accepted == k


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_seeded(targets, drafts):
    target, draft = targets["hybrid50"], drafts["mamba2"]
    ids, mask = _prompts(4)
    engine = engine_for(target, draft, k=3)
    options = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, stop_token_ids=[])
    first = engine.generate(ids, mask, seed=7, **options)
    assert torch.equal(engine.generate(ids, mask, seed=7, **options), first)
    assert not torch.equal(engine.generate(ids, mask, seed=8, **options), first)
    torch.manual_seed(3)  # no seed: follows torch's global one
    again = engine.generate(ids, mask, **options)
    torch.manual_seed(3)
    assert torch.equal(engine.generate(ids, mask, **options), again)


@pytest.fixture(scope="module")
def small_pair():
    """As tests/test_speculative.py's: a 2-layer hybrid over 8 tokens and a draft that disagrees."""
    target = mambaify.convert(tiny_teacher("llama", **SMALL), attention=0.5).eval()
    return target, tiny_teacher("llama", seed=1, **SMALL)


def _always_accept(drafts, p, q, u_accept, u_next):
    """A wrong rule: keep every draft token, then sample the target's next token."""
    b, k = drafts.shape
    from mambaify.generate.speculative import sample_inverse_cdf

    return torch.full((b,), k, device=drafts.device), sample_inverse_cdf(p[:, k], u_next)


@pytest.mark.parametrize("rule, k, ok, draft_vocab", [
    (None, 2, True, None), (None, 1, True, None), (_always_accept, 2, False, None),
    (None, 2, True, [1, 3, 4, 6]), (_always_accept, 2, False, [1, 3, 4, 6]),
], ids=["rejection-k2", "rejection-k1", "always-accept", "rejection-k2-cut-head", "always-accept-cut-head"])
def test_sampling_preserves_target_distribution(small_pair, monkeypatch, rule, k, ok, draft_vocab):
    """3000 rows sample 2 tokens each through the engine; the rejection rule passes the chi-square
    bound of tests/test_speculative.py and a wrong rule, swapped into the engine, fails it. Also
    with the draft's head cut to half the vocabulary (its proposals zero off those ids)."""
    target, draft = small_pair
    if rule is not None:
        monkeypatch.setattr(spec, "rejection_rule", rule)
    prompt = torch.tensor([5])
    rows = 3000
    engine = SpeculativeEngine(target, draft, k=k, max_batch_size=rows, max_length=8, draft_vocab=draft_vocab)
    tokens = engine.generate(prompt[None].expand(rows, -1), max_new_tokens=2, temperature=1.0, seed=k,
                             stop_token_ids=[])
    stat, df = _chi_square(tokens, _exact_two_tokens(target, prompt))
    bound = df + 6 * (2 * df) ** 0.5
    assert (stat < bound) == ok, f"chi2={stat:.1f} df={df} bound={bound:.1f}"
    if rule is None:
        assert 0 < engine.stats.mean_accepted < k  # both acceptance and rejection happened
    assert tokens.max() < V


# ---------------------------------------------------------------------------------------------
# Stopping, streaming, bad input


def test_stop_tokens_and_max_new_tokens_per_row(targets, drafts):
    """Rows stop at their own stop token (emitted, then padding) mid-round, as the plain engine's do."""
    target, draft = targets["hybrid50"], drafts["transformer"]
    ids, mask = _prompts(4)
    plain = Engine(target, max_batch_size=4, max_length=40)
    engine = engine_for(target, draft, k="auto")
    free = plain.generate(ids, mask, max_new_tokens=14, stop_token_ids=[])
    for stop in ([free[1, 4].item()], [free[0, 2].item(), free[3, 9].item()], [free[2, 0].item()]):
        expected = plain.generate(ids, mask, max_new_tokens=14, stop_token_ids=stop)
        for k in (2, 5):
            assert torch.equal(engine.generate(ids, mask, max_new_tokens=14, stop_token_ids=stop, k=k), expected)
    for new in (1, 2, 7):
        assert torch.equal(engine.generate(ids, mask, max_new_tokens=new, stop_token_ids=[], k=6), free[:, :new])



@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
def test_an_engine_sized_to_the_request_holds_rows_that_finish_early(targets, drafts, draft_name):
    """max_length exactly prompt + max_new_tokens: a row that reaches its budget mid-round (its
    accepted drafts past the budget are not committed) sits out the rounds the other rows still
    need, writing its K + 1 round slots within the engine's slots. Seen on the real models at
    batch 4, K = 4 as an out-of-bounds cache index before the fix."""
    target, draft = targets["hybrid50"], drafts[draft_name]
    ids, mask = _prompts(4)
    for new in (5, 9, 13):
        engine = SpeculativeEngine(target, draft, k="auto", k_choices=(2, 4, 6), max_batch_size=4,
                                   max_length=ids.shape[1] + new)
        expected = plain_greedy(target, ids, mask, new)
        for k in (2, 4, 6):
            assert torch.equal(engine.generate(ids, mask, max_new_tokens=new, stop_token_ids=[], k=k), expected), (new, k)

def test_round_times_report_the_setting_of_the_last_requests(targets, drafts):
    """round_times: None before a request of that batch size, K and sampling; after one, the
    draft and verify rounds' times and the host's gap, in ms, for that setting only."""
    engine = SpeculativeEngine(targets["hybrid50"], drafts["transformer"], k="auto", k_choices=(2, 3),
                               max_batch_size=2, max_length=40)
    ids, mask = _prompts(2)
    assert engine.round_times(2, 3) is None
    engine.generate(ids, mask, max_new_tokens=8, stop_token_ids=[], k=3)
    times = engine.round_times(2, 3)
    assert set(times) == {"draft_ms", "verify_ms", "host_gap_ms"}
    assert times["draft_ms"] > 0 and times["verify_ms"] > 0 and times["host_gap_ms"] >= 0
    assert engine.round_times(2, 2) is None  # K = 2 never ran
    assert engine.round_times(1, 3) is None  # nor batch 1
    assert engine.round_times(2, 3, temperature=1.0) is None  # nor sampling


def test_measure_rounds_times_replays_that_commit_nothing(targets, drafts):
    """measure_rounds replays a setting's rounds with the rows finished: positive times, the
    caches' lengths untouched (the context of the last request stays), and the next request's
    tokens unchanged."""
    engine = SpeculativeEngine(targets["hybrid50"], drafts["transformer"], k="auto", k_choices=(2, 3),
                               max_batch_size=2, max_length=40)
    ids, mask = _prompts(2)
    expected = engine.generate(ids, mask, max_new_tokens=8, stop_token_ids=[], k=3)
    lengths = engine.target_cache.lengths.clone(), engine.draft_cache.lengths.clone()
    times = engine.measure_rounds(2, 3, repeats=3)
    assert set(times) == {"draft_ms", "verify_ms"} and times["draft_ms"] > 0 and times["verify_ms"] > 0
    assert torch.equal(engine.target_cache.lengths, lengths[0]) and torch.equal(engine.draft_cache.lengths, lengths[1])
    assert engine.measure_rounds(1, 2, repeats=1)["verify_ms"] > 0  # a new setting: captured first
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=8, stop_token_ids=[], k=3), expected)
    with pytest.raises(ValueError, match="largest K"):
        engine.measure_rounds(2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        engine.measure_rounds(3, 2)


@pytest.mark.parametrize("target_name, draft_name", [("hybrid50", "transformer"), ("mamba2", "mamba2")])
def test_launching_rounds_ahead_changes_nothing_but_the_waiting(targets, drafts, target_name, draft_name):
    """launch_ahead (on by default on CUDA) queues round n + 1 before the host reads round n's
    report: the same tokens, greedy and seeded sampling, with and without stop tokens, and at a
    fixed K the same rounds; adaptive K may choose differently (it learns a round later), never
    the tokens of greedy decoding."""
    target, draft = targets[target_name], drafts[draft_name]
    for batch in (1, 4):
        ids, mask = _prompts(batch)
        waiting = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=40)
        ahead = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=40)
        assert not waiting.launch_ahead  # the CPU default
        ahead.launch_ahead = True
        free = waiting.generate(ids, mask, max_new_tokens=14, stop_token_ids=[])
        for stop in ([], [free[0, 5].item()], sorted({row[3] for row in free.tolist()})):
            for k in (1, 3, 6, "auto"):
                options = dict(max_new_tokens=14, stop_token_ids=stop, k=k)
                expected = waiting.generate(ids, mask, **options)
                assert torch.equal(ahead.generate(ids, mask, **options), expected), (batch, stop, k)
                if k != "auto":
                    assert ahead.stats.rounds == waiting.stats.rounds
                    assert ahead.stats.accepted == waiting.stats.accepted
                    sampled = dict(options, temperature=1.0, top_k=20, seed=5)
                    assert torch.equal(ahead.generate(ids, mask, **sampled), waiting.generate(ids, mask, **sampled))


@pytest.mark.parametrize("target_name, draft_name", [("hybrid50", "transformer"), ("mamba2", "mamba2")])
def test_prompts_padded_to_a_prefill_width_give_the_same_tokens(targets, drafts, target_name, draft_name):
    """The padding the CUDA-graphed prefill adds to short prompts (both models' prefills from one
    graph per width), run eagerly: the same tokens, greedy and sampled, one-token prompts too."""
    target, draft = targets[target_name], drafts[draft_name]
    plain = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=40)
    padded = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=40)
    assert plain.prefill_widths is None  # the CPU default
    padded.prefill_widths = (16, 24)
    ids, mask = _prompts(4)
    one_token = torch.tensor([[7], [9]])
    for batch, batch_mask in ((ids, mask), (ids[:1], mask[:1]), (one_token, torch.ones_like(one_token))):
        for options in (dict(stop_token_ids=[]), dict(temperature=1.0, top_k=20, seed=4, stop_token_ids=[])):
            expected = plain.generate(batch, batch_mask, max_new_tokens=12, **options)
            assert torch.equal(padded.generate(batch, batch_mask, max_new_tokens=12, **options), expected)
    assert int(padded.target_cache.lengths[0]) == 16 + 11  # the prompt filled slots 0..15
    # Sized exactly to the request, the engine pads into its pad slots past max_length.
    width = ids.shape[1]
    tight = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=width + 20, prefill_pad_slots=8)
    tight.prefill_widths = (16, 24)
    assert tight.pad_slots == 8 and plain.pad_slots == 0
    expected = plain.generate(ids, mask, max_new_tokens=20, stop_token_ids=[])
    assert torch.equal(tight.generate(ids, mask, max_new_tokens=20, stop_token_ids=[]), expected)
    assert tight.prefill_counts == {"graphed": 0, "eager": 1}  # padded, but the CPU runs it eagerly
    assert int(tight.target_cache.lengths[0]) > width  # the padding took slots past the prompt


def test_frequent_tokens():
    lists = [[5, 5, 7, 9], [7, 5, 3], [9]]
    assert spec.frequent_tokens(lists, 2) == [5, 7]  # 5 x3, 7 x2 (ties: the lower id first)
    assert spec.frequent_tokens(lists, 2, always=[2]) == [2, 5, 7]
    assert spec.frequent_tokens(lists, 10) == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="n must be"):
        spec.frequent_tokens(lists, 0)


@pytest.mark.parametrize("target_name, draft_name", [("hybrid50", "transformer"), ("mamba2", "mamba2")])
def test_a_draft_head_cut_to_frequent_tokens_keeps_greedy_exact(targets, drafts, target_name, draft_name):
    """draft_vocab cuts the draft's LM head to some ids: greedy output stays the target's own,
    drafts come only from those ids, and with every id the engine is the uncut one."""
    target, draft = targets[target_name], drafts[draft_name]
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids, mask, 12)
    vocab = spec.frequent_tokens(expected.tolist(), 12)  # the tokens the target emits most, a few only
    cut = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=40, draft_vocab=vocab)
    assert cut.draft_stack.lm_head.weight.shape[0] == len(vocab) and draft.lm_head.weight.shape[0] > len(vocab)
    for batch in (1, 4):
        for k in (1, 3, "auto"):
            tokens = cut.generate(ids[:batch], mask[:batch], max_new_tokens=12, stop_token_ids=[], k=k)
            assert torch.equal(tokens, expected[:batch]), (batch, k)
            if k != "auto":  # the last round's drafts
                assert set(cut.buffers.drafts[:batch, :k].flatten().tolist()) <= set(vocab)
    whole = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=40,
                              draft_vocab=range(target.config.vocab_size))
    uncut = engine_for(target, draft, k=3)
    assert torch.equal(whole.generate(ids, mask, max_new_tokens=12, stop_token_ids=[]),
                       uncut.generate(ids, mask, max_new_tokens=12, stop_token_ids=[]))
    assert whole.stats.accepted == uncut.stats.accepted
    for bad in ([], [-1, 3], [target.config.vocab_size]):
        with pytest.raises(ValueError, match="draft_vocab"):
            SpeculativeEngine(target, draft, draft_vocab=bad)


def test_stream_yields_what_generate_returns(targets, drafts):
    target, draft = targets["mamba2"], drafts["mamba2"]
    ids, mask = _prompts(4)
    engine = engine_for(target, draft, k=4)
    free = engine.generate(ids, mask, max_new_tokens=10, stop_token_ids=[])
    stop = [free[2, 3].item()]
    generated = engine.generate(ids, mask, max_new_tokens=10, stop_token_ids=stop)
    steps = list(engine.stream(ids, mask, max_new_tokens=10, stop_token_ids=stop))
    assert len(steps) == generated.shape[1]
    streamed = torch.tensor([[engine.pad_token_id if t is None else t for t in step] for step in steps]).T
    assert torch.equal(streamed, generated)
    stopped_at = next(i for i, step in enumerate(steps) if step[2] is None)
    assert steps[stopped_at - 1][2] == stop[0]


def test_bad_requests_are_refused(targets, drafts):
    target, draft = targets["hybrid50"], drafts["transformer"]
    with pytest.raises(ValueError, match="k .draft tokens per round"):
        SpeculativeEngine(target, draft, k=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        SpeculativeEngine(target, draft, max_batch_size=0)
    engine = engine_for(target, draft, k=3, k_choices=(1, 2, 3))
    with pytest.raises(ValueError, match="largest K"):
        engine.generate([[5, 6]], max_new_tokens=4, k=7)
    with pytest.raises(ValueError, match="max_length"):
        engine.generate([[5, 6]], max_new_tokens=39)
    with pytest.raises(ValueError, match="stop token ids"):
        engine.generate([[5, 6]], max_new_tokens=4, stop_token_ids=list(range(17)))
    with pytest.raises(ValueError, match="left padding"):
        engine.generate(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    stream = engine.stream([[5, 6]], max_new_tokens=8, stop_token_ids=[])
    next(stream)
    engine.generate([[7, 8]], max_new_tokens=2)  # a new request takes over the buffers
    with pytest.raises(RuntimeError, match="another request"):
        list(stream)
    assert parse_k("auto") == "auto" and parse_k("3") == 3
    with pytest.raises(ValueError, match="--k"):
        parse_k("many")


def test_adaptive_k_follows_acceptance_and_costs():
    """High acceptance and a cheap draft favour a large K; low acceptance a small one; unmeasured
    K values are estimated from the measured ones."""
    times = RoundTimes()
    times.observe(2, draft_s=0.3e-3, verify_s=10e-3, wall_s=10.5e-3)
    times.observe(8, draft_s=0.9e-3, verify_s=11e-3, wall_s=12.1e-3)
    assert times.round_seconds(4) == pytest.approx(0.5e-3 + 10e-3 + (11e-3 - 10e-3) * 2 / 6 + 0.2e-3)
    chooser = AdaptiveK([1, 2, 4, 8], times)
    for _ in range(30):
        chooser.observe(8, [8, 8, 7, 8])
    assert chooser.alpha > 0.9 and chooser.choose() == 8
    for _ in range(150):  # the old rounds are forgotten
        chooser.observe(2, [0, 0, 1, 0])
    assert chooser.alpha == pytest.approx(0.2, abs=0.02)
    assert chooser.choose() == 2  # one more draft step costs 1% of a round and yields 4%
    slow_draft = RoundTimes()  # a draft step costs half a verify call
    slow_draft.observe(1, draft_s=10e-3, verify_s=10e-3, wall_s=20e-3)
    slow_draft.observe(2, draft_s=15e-3, verify_s=10e-3, wall_s=25e-3)
    chooser.times = slow_draft
    assert chooser.choose() == 1
    assert AdaptiveK([1, 3, 6], RoundTimes()).choose() == 3  # nothing measured: start near 4


# ---------------------------------------------------------------------------------------------
# Entry points: model.generate(assistant_model=...), the module function, the CLI


def test_model_generate_with_an_assistant(targets, drafts):
    target, draft = targets["hybrid50"], drafts["mamba2"]
    ids, mask = _prompts(4)
    free = plain_greedy(target, ids, mask, 9)
    eos = free[1, 3].item()  # row 1 (at least) ends early; the others are padded once they end
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                               eos_token_id=eos)
    assert (expected[:, ids.shape[1]:] == 0).any()
    for k in (3, "auto"):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                              eos_token_id=eos, assistant_model=draft, num_assistant_tokens=k)
        assert torch.equal(out, expected)
    torch.manual_seed(0)
    sampled = target.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, assistant_model=draft)
    torch.manual_seed(0)
    assert torch.equal(target.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                       assistant_model=draft), sampled)
    assert sampled.shape == (4, ids.shape[1] + 6) and torch.equal(sampled[:, : ids.shape[1]], ids)
    with pytest.raises(ValueError, match="num_beams"):
        target.generate(ids, max_new_tokens=3, num_beams=2, assistant_model=draft)
    # Without an assistant, generate() is transformers' own.
    assert torch.equal(target.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                                       pad_token_id=0)[:, ids.shape[1]:], free)


def test_plain_llama_target():
    """A Llama-family target (every layer attention) with a pure-Mamba2 draft."""
    teacher = without_eos(bigram_teacher(0))
    draft = mambaify.convert(bigram_teacher(3, num_hidden_layers=2), attention=0.0).eval()
    ids, mask = _prompts(4)
    expected = teacher.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(spec.generate(teacher, draft, ids, mask, max_new_tokens=10, k=3), expected)
    assert torch.equal(spec.generate(teacher, draft, ids, mask, max_new_tokens=10, k="auto"), expected)


@pytest.fixture(scope="module")
def saved_pair(teacher_dir, tmp_path_factory):
    """A saved 50% hybrid of the tiny teacher, and the teacher itself as its draft (one tokenizer)."""
    target_dir = tmp_path_factory.mktemp("target")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    mambaify.convert(teacher, attention=0.5).save_pretrained(target_dir)
    tiny_tokenizer().save_pretrained(target_dir)
    return target_dir, teacher_dir


def test_cli_generate_and_chat_with_a_draft(saved_pair, capsys, monkeypatch):
    target_dir, draft_dir = saved_pair
    plain = ["generate", str(target_dir), "Hello! How", "--max-new-tokens", "8", "--device", "cpu"]
    assert cli_main(plain) == 0
    expected = capsys.readouterr().out
    for extra in (["--k", "3"], ["--k", "auto", "--stream"]):
        assert cli_main([*plain, "--draft", str(draft_dir), *extra]) == 0
        captured = capsys.readouterr()
        assert captured.out == expected
        assert "mean accepted length" in captured.err and "tokens/s" in captured.err
        if extra[1] == "3":  # the distribution behind the mean, at the one K that ran
            line = next(line for line in captured.err.splitlines() if "drafts accepted per round" in line)
            assert line.strip().startswith("K=3,") and line.count("%") == 4

    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    first = Engine(model, tiny_tokenizer(), max_length=256).chat([{"role": "user", "content": "Hello!"}],
                                                                  max_new_tokens=6)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/exit\n"))
    args = ["chat", str(target_dir), "--max-new-tokens", "6", "--device", "cpu", "--draft", str(draft_dir)]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{first}\n" and "mean accepted length" in captured.err

    assert cli_main([*plain, "--draft", str(draft_dir), "--k", "zero"]) == 2
    assert "--k" in capsys.readouterr().err

    # --draft-int8: the draft's layers quantized (the same output), and refused without a draft.
    quantized = []
    real_quantize = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda model: quantized.append(model) or real_quantize(model))
    assert cli_main([*plain, "--draft", str(draft_dir), "--k", "3", "--draft-int8"]) == 0
    assert capsys.readouterr().out == expected and len(quantized) == 1 and quantize.is_quantized(quantized[0])
    assert cli_main([*plain, "--draft-int8"]) == 2
    assert "--draft-int8 quantizes the draft: give one with --draft" in capsys.readouterr().err

    # A draft saved with its token list (distill-draft --draft-vocab): the CLI cuts its head.
    cut_dir = target_dir.parent / "draft-with-vocab"
    shutil.copytree(draft_dir, cut_dir, dirs_exist_ok=True)
    (cut_dir / spec.DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": list(range(0, 97, 3))}))
    made = []
    real_init = spec.SpeculativeEngine.__init__
    monkeypatch.setattr(spec.SpeculativeEngine, "__init__",
                        lambda self, *a, **k: made.append(k.get("draft_vocab")) or real_init(self, *a, **k))
    assert cli_main([*plain, "--draft", str(cut_dir), "--k", "3"]) == 0
    assert capsys.readouterr().out == expected and made == [list(range(0, 97, 3))]
    monkeypatch.setattr(spec.SpeculativeEngine, "__init__", real_init)

    # --compile reaches both engines (compile_step stubbed: the compiled rounds' results are
    # tested below; here only that the flag compiles the plain step and the speculative rounds).
    compiled = []

    def record(step, mode="default"):
        compiled.append(step)
        step()  # compile_step's own first call
        return step

    monkeypatch.setattr("mambaify.generate.engine.compile_step", record)
    assert cli_main([*plain, "--compile"]) == 0
    assert capsys.readouterr().out == expected and len(compiled) == 1
    assert cli_main([*plain, "--compile", "--draft", str(draft_dir), "--k", "3"]) == 0
    assert capsys.readouterr().out == expected and len(compiled) == 3  # + the draft and verify rounds


# ---------------------------------------------------------------------------------------------
# torch.compile: the rounds compiled (inductor's C++ backend on the CPU) against the eager ones.
# Two-layer models and one compiled (batch, K, sampling) setting per test: compiling a round
# takes seconds, and the first compile in a fresh environment also builds inductor's prelude.


@pytest.fixture(scope="module")
def compile_models(drafts):
    """A 2-layer hybrid target (an attention and a Mamba layer) and the file's 2-layer drafts.
    The target's embeddings are smaller than bigram_teacher's default, so that its layers weigh
    more than the bigram table: a wrong state changes its tokens, and the drafts (which follow
    the table) are right about a third of the time."""
    teacher = bigram_teacher(0, num_hidden_layers=2, embedding_scale=0.06)
    return {"target": without_eos(mambaify.convert(teacher, attention=0.5).eval()), **drafts}


def compiled_and_eager(target, draft, **options) -> tuple[SpeculativeEngine, SpeculativeEngine]:
    # Three rows of buffers for two-row requests: the compiled rounds write into views of them.
    options = dict(max_batch_size=3, max_length=40, **options)
    return (SpeculativeEngine(target, draft, compile=True, **options), SpeculativeEngine(target, draft, **options))


def assert_same_caches(a: spec.SpeculativeCache, b: spec.SpeculativeCache, rows: int) -> None:
    a, b = a.rows(rows), b.rows(rows)
    for name in ("pad_lengths", "lengths", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for layer_a, layer_b in zip(a.layers, b.layers):
        if isinstance(layer_a, MambaVerifyBuffers):
            pairs = [(layer_a.checkpoint, layer_b.checkpoint), (layer_a.window, layer_b.window), (layer_a.x, layer_b.x)]
        else:
            pairs = [(layer_a.keys, layer_b.keys), (layer_a.values, layer_b.values)]
        for x, y in pairs:
            assert torch.allclose(x, y, atol=1e-5), (type(layer_a).__name__, (x - y).abs().max())


@pytest.mark.parametrize("draft_name, split_k", [("transformer", False), ("mamba2", True)],
                         ids=["attention-draft", "mamba2-draft-split-k"])
def test_compiled_rounds_equal_eager(compile_models, draft_name, split_k, monkeypatch):
    """Greedy at batch 2, K = 2: the compiled rounds give the eager rounds' tokens, acceptance and
    caches. split_k: the target's attention takes the CUDA branch (mambaify::decode_attention
    over slots, on its PyTorch path), which must stay one opaque op for the round to compile."""
    if split_k:
        monkeypatch.setattr(spec, "use_split_k_attention", lambda device: True)
    target, draft = compile_models["target"], compile_models[draft_name]
    compiled, eager = compiled_and_eager(target, draft, k=2)
    ids, mask = _prompts(2)
    greedy = dict(max_new_tokens=16, stop_token_ids=[])
    tokens = compiled.generate(ids, mask, **greedy)
    assert torch.equal(tokens, eager.generate(ids, mask, **greedy))
    assert torch.equal(tokens, plain_greedy(target, ids, mask, 16))
    stats = compiled.stats
    assert (stats.rounds, stats.accepted) == (eager.stats.rounds, eager.stats.accepted)
    assert 0 < stats.mean_accepted < 2  # rounds that accepted and rounds that rejected
    for ours, theirs in ((compiled.target_cache, eager.target_cache), (compiled.draft_cache, eager.draft_cache)):
        assert_same_caches(ours, theirs, 2)
    assert compiled.is_compiled(2, 2) and compiled.compile_error is None
    assert not compiled.is_compiled(1, 2) and not compiled.is_compiled(2, 2, temperature=1.0)
    assert not eager.is_compiled(2, 2)
    seconds = compiled.compile_seconds
    assert seconds > 0
    # Another request of the setting (other prompts, a stop token) replays the compiled rounds,
    # which raise rather than recompile.
    later = dict(max_new_tokens=9, stop_token_ids=[int(tokens[0, 4])])
    assert torch.equal(compiled.generate(ids.flip(0), mask.flip(0), **later),
                       eager.generate(ids.flip(0), mask.flip(0), **later))
    assert compiled.compile_seconds == seconds


def test_compiled_rounds_with_prepared_norms(compile_models, monkeypatch):
    """MAMBAIFY_PREPARED_NORMS=1, the norms folded: the rounds at batch 2 carry the prepared
    norms (three tensors out of one op) between the layers and still compile to one graph
    each; plain greedy decoding's tokens."""
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "1")
    target, draft = compile_models["target"], compile_models["transformer"]
    engine = SpeculativeEngine(target, draft, k=2, compile=True, max_batch_size=3, max_length=40,
                               small_batch_linear=True, fold_norms=True)
    assert all(r.prepare_norms for r in engine.target_stack.layers)
    ids, mask = _prompts(2)
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=16, stop_token_ids=[]),
                       plain_greedy(target, ids, mask, 16))
    assert engine.is_compiled(2, 2) and engine.compile_error is None


@pytest.mark.parametrize("cut_head", [False, True], ids=["whole-head", "cut-head"])
def test_compiled_sampling_rounds_equal_eager(compile_models, cut_head):
    """Seeded sampling (temperature, top-k, top-p; the rejection rule) draws the same tokens
    from the compiled rounds as from the eager ones; also with the draft's head cut to half the
    vocabulary (the proposals mapped back, their distribution scattered onto the whole one)."""
    target = compile_models["target"]
    vocab = list(range(0, target.config.vocab_size, 2)) if cut_head else None
    compiled, eager = compiled_and_eager(target, compile_models["transformer"], k=2, draft_vocab=vocab)
    ids, mask = _prompts(2)
    sampled = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.0, top_k=20, top_p=0.95)
    first = compiled.generate(ids, mask, seed=7, **sampled)
    assert torch.equal(first, eager.generate(ids, mask, seed=7, **sampled))
    assert compiled.stats.accepted == eager.stats.accepted
    assert not torch.equal(compiled.generate(ids, mask, seed=8, **sampled), first)
    assert compiled.is_compiled(2, 2, temperature=1.0, top_k=20, top_p=0.95) and not compiled.is_compiled(2, 2)


def test_compiled_adaptive_k_switches_between_compiled_programs(compile_models):
    """k="auto" over two K values compiles a program of each: four compiled rounds of two code
    objects, whose compiled entries live side by side and replay without recompiling."""
    target = compile_models["target"]
    # The attention draft, as in test_compiled_rounds_equal_eager: the K = 2 program compiles
    # the same graphs, which inductor's cache then holds.
    compiled, eager = compiled_and_eager(target, compile_models["transformer"], k="auto", k_choices=(1, 2))
    ids, mask = _prompts(2)
    greedy = dict(max_new_tokens=16, stop_token_ids=[])
    tokens = compiled.generate(ids, mask, **greedy)
    assert torch.equal(tokens, eager.generate(ids, mask, **greedy))
    assert torch.equal(tokens, plain_greedy(target, ids, mask, 16))
    assert compiled.is_compiled(2, 1) and compiled.is_compiled(2, 2)
    # The chooser may keep to one K on this text: requests at each fixed K replay both programs.
    seconds = compiled.compile_seconds
    for k in (1, 2):
        assert torch.equal(compiled.generate(ids, mask, k=k, **greedy), tokens)
        assert compiled.stats.k_used == {k: compiled.stats.rounds}
    assert compiled.compile_seconds == seconds


def test_compile_settings(compile_models, monkeypatch, caplog):
    target, draft = compile_models["target"], compile_models["mamba2"]
    small = dict(max_batch_size=2, max_length=24)
    assert SpeculativeEngine(target, draft, compile="auto", **small).compile is False  # off on the CPU
    with pytest.raises(ValueError, match="compile takes True, False or 'auto'"):
        SpeculativeEngine(target, draft, compile="bogus", **small)
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        SpeculativeEngine(target, draft, compile=True, compile_mode="reduce-overhead", **small)

    def broken(step, mode):
        raise RuntimeError("inductor is unhappy\nsecond line")

    monkeypatch.setattr(engine_module, "compile_step", broken)
    ids, mask = _prompts(2)
    options = dict(max_new_tokens=6, stop_token_ids=[], k=2)
    expected = SpeculativeEngine(target, draft, **small).generate(ids, mask, **options)
    insisting = SpeculativeEngine(target, draft, compile=True, **small)
    with pytest.raises(engine_module.CompileError, match="inductor is unhappy"):
        insisting.generate(ids, mask, **options)
    # "auto" (on CUDA) falls back to the eager rounds and says why.
    falling_back = SpeculativeEngine(target, draft, compile=True, **small)
    falling_back.compile_setting = "auto"
    with caplog.at_level("WARNING", logger=engine_module.__name__):
        assert torch.equal(falling_back.generate(ids, mask, **options), expected)
    assert falling_back.compile is False and not falling_back.is_compiled(2, 2)
    assert falling_back.compile_error == "RuntimeError: inductor is unhappy"
    assert "decoding without torch.compile" in caplog.text


def verify_ops_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, T, t, h, n, p, c, d_conv = 2, 4, 3, 3, 4, 5, 6, 4
    return dict(
        checkpoint=randn(b, h, n, p), x_cache=randn(b, T, h, p), dt_cache=randn(b, T, h).abs(),
        B_cache=randn(b, T, h, n), states=randn(b, T, h, n, p), counts=torch.tensor([1, T]),
        x=randn(b, t, h, p), dt=randn(b, t, h).abs(), A=-torch.rand(h, generator=g, dtype=torch.float64) - 0.1,
        B=randn(b, t, h, n), C=randn(b, t, h, n), D=randn(h),
        window=randn(b, d_conv - 1 + T, c), xBC=randn(b, t, c), weight=randn(c, d_conv), bias=randn(c),
    )


def verify_ops_step(i: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The three verify calls a compiled round may make, each writing its buffers in place."""
    conv = ops.conv_verify_inplace(i["window"], i["counts"], i["xBC"], i["weight"], i["bias"], silu=True)
    y = ops.ssd_verify_inplace(i["checkpoint"], i["x_cache"], i["dt_cache"], i["B_cache"], i["counts"],
                               i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"])
    y_stored = ops.ssd_verify_store_states(i["checkpoint"], i["states"], i["counts"], i["x"], i["dt"], i["A"],
                                           i["B"], i["C"], i["D"])
    return conv, y, y_stored


def test_round_custom_ops_stay_opaque_under_compile():
    i = verify_ops_inputs()
    # Declared mutations, fake functions and schemas agree with what the ops do.
    fresh = {k: v.clone() for k, v in i.items()}
    torch.library.opcheck(torch.ops.mambaify.ssd_verify_inplace.default, (
        fresh["checkpoint"], fresh["x_cache"], fresh["dt_cache"], fresh["B_cache"], i["counts"], i["x"], i["dt"],
        i["A"], i["B"], i["C"], None, torch.empty_like(i["x"]), None))
    torch.library.opcheck(torch.ops.mambaify.ssd_verify_store_states.default, (
        fresh["checkpoint"], fresh["states"], i["counts"], i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"],
        torch.empty_like(i["x"]), True))
    torch.library.opcheck(torch.ops.mambaify.conv_verify_inplace.default, (
        fresh["window"], i["counts"], i["xBC"], i["weight"], None, torch.empty_like(i["xBC"]), False, None))
    # The split-K attention op over a verify call's t = 3 queries, laid out as attend_rows makes
    # them ((b, t, h, d) transposed): its output's layout must be the one its fake function gives.
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 3, 4, 8, generator=g).transpose(1, 2)
    keys, values = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    torch.library.opcheck(torch.ops.mambaify.decode_attention.default,
                          (query, keys, values, torch.tensor([0, 2]), torch.tensor([[4, 5, 6], [5, 6, 7]]), 0.3, None))

    # Under torch.compile: one graph (fullgraph: no host read of the counts), each call one
    # opaque op, every buffer written in place as eagerly.
    got, expected, compiled_inputs, eager_inputs, mambaify_ops = run_compiled_and_eager(verify_ops_step, i)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for name in ("checkpoint", "x_cache", "dt_cache", "B_cache", "states", "window"):
        assert torch.equal(compiled_inputs[name], eager_inputs[name]), name
        assert not torch.equal(compiled_inputs[name], i[name]), name
    assert mambaify_ops == ["mambaify.conv_verify_inplace", "mambaify.ssd_verify_inplace",
                            "mambaify.ssd_verify_store_states"]


# ---------------------------------------------------------------------------------------------
# The benchmark script, on tiny models on the CPU


def _bench_module():
    """benchmarks/bench_speculative.py as a module (registered, as its dataclasses need)."""
    import importlib.util

    if "bench_speculative" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_speculative", REPO / "benchmarks" / "bench_speculative.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_speculative"] = bench
        spec.loader.exec_module(bench)
    return sys.modules["bench_speculative"]


def test_benchmark_script_runs_on_tiny_models(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_speculative.py"), "--tiny", "--out", str(out),
               "--k", "1,3,auto", "--batch", "1,2", "--new-tokens", "8", "--prompts", "2", "--verify-k", "2,3",
               "--attention", "0.5", "--repeats", "1", "--accepted", "1.5,2.5", "--draft-vocab", "0,64",
               "--e2e-draft-vocab", "0,48"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "bench_speculative.json").read_text())
    end_to_end = data["end_to_end"]
    assert {p["batch"] for p in end_to_end} == {1, 2}
    assert {p["k"] for p in end_to_end if p["path"] == "speculative"} == {1, 3, "auto"}
    # One plain point per batch size; each K with the whole draft head and with it cut to 48 rows.
    assert [(p["batch"], p["k"], p.get("draft_vocab")) for p in end_to_end] == [
        (b, k, v) for b in (1, 2) for k, v in [(None, None)] + [(k, v) for v in (None, 48) for k in (1, 3, "auto")]]
    assert all(p["tokens_per_s"] > 0 for p in end_to_end)
    # Where a request's time goes: its first token, and the tokens/s of the rest.
    assert all(p["first_token_ms"] > 0 and p["decode_tokens_per_s"] > 0 for p in end_to_end)
    assert all(p["decode_ratio"] == 1.0 for p in end_to_end if p["path"] == "plain")
    # Each timed request's prefill is counted (all eager on the CPU, which graphs none: no warning).
    assert all(p["eager_prefills"] == 2 // p["batch"] for p in end_to_end)
    assert "ran eagerly" not in result.stdout
    # A round's wall time, and at a fixed K the device's share of it (the engine's round_times).
    speculative = [p for p in end_to_end if p["path"] == "speculative"]
    # round_ms is a request's time less its first token's, measured apart, over its rounds: on a
    # busy 2-core CPU the difference of two noisy tiny times can come out negative (it did under
    # pytest-xdist), so here it is only checked to be a number; the engine's own clock is below.
    assert all(math.isfinite(p["round_ms"]) for p in speculative)
    assert all(p["draft_ms"] > 0 and p["verify_ms"] > 0 and p["host_gap_ms"] >= 0
               for p in speculative if p["k"] != "auto")
    assert all("verify_ms" not in p for p in speculative if p["k"] == "auto")
    verify = data["verify_cost"]
    assert {p["k"] for p in verify} == {2, 3} and {p["kernel"] for p in verify} == {"fused", "store_states"}
    assert {p["draft_vocab"] for p in verify} == {None, 64}  # the whole draft head, and cut to 64 rows
    assert all(p["verify_ms"] > 0 and p["decode_steps_ms"] > 0 for p in verify)
    assert data["speedup"] and all(p["speedup"] > 0 for p in data["speedup"])
    markdown = (out / "bench_speculative.md").read_text()
    assert "| batch |" in markdown and "verify" in markdown and "decode ratio" in markdown
    assert "round ms: wall (device draft + verify)" in markdown
    assert "| 1 | speculative | 3 | False | modules | 48, float |" in markdown
    assert "| 1 | speculative | 3 | False | modules | all, float |" in markdown


def test_benchmark_script_sets_both_kinds_of_linear_layers_side_by_side(tmp_path):
    """--e2e-linear modules,split-k: a plain engine of each kind, and each speculative point
    measured against the plain engine of its own kind (the same greedy tokens in float32)."""
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_speculative.py"), "--tiny", "--out", str(out),
               "--k", "2", "--batch", "1", "--new-tokens", "8", "--prompts", "2", "--repeats", "1",
               "--e2e-linear", "modules,split-k", "--verify-k", "2", "--attention", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    end_to_end = json.loads((out / "bench_speculative.json").read_text())["end_to_end"]
    assert [(p["path"], p["linear"]) for p in end_to_end] == [
        ("plain", "modules"), ("speculative", "modules"), ("plain", "split-k"), ("speculative", "split-k")]
    for plain, speculative in (end_to_end[:2], end_to_end[2:]):
        assert speculative["ratio"] == pytest.approx(speculative["tokens_per_s"] / plain["tokens_per_s"])
        assert speculative["match"] == 1.0
    markdown = (out / "bench_speculative.md").read_text()
    assert "| 1 | speculative | 2 | False | split-k | all, float |" in markdown
    bad = subprocess.run(command[:-6] + ["--e2e-linear", "cublas"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "linear layers are modules or split-k, got 'cublas'" in bad.stderr


def test_round_timing_script_runs_on_tiny_models(tmp_path):
    out = tmp_path / "rounds"
    command = [sys.executable, str(REPO / "benchmarks" / "round_timing.py"), "--tiny", "--out", str(out),
               "--batch", "1,2", "--k", "2", "--new-tokens", "6", "--prompt-tokens", "5", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads((out / "round_timing.json").read_text())["points"]
    assert [p["engine"] for p in points] == ["plain"] + ["speculative"] * 4 + ["plain"] + ["speculative"] * 4
    assert all(p["ms_per_token"] > 0 for p in points if p["engine"] == "plain")
    speculative = [p for p in points if p["engine"] == "speculative"]
    assert all(p["ms_per_round"] > 0 and p["draft_ms"] > 0 and p["verify_ms"] > 0 and p["rounds"] >= 1
               for p in speculative)
    assert not any(p["launch_ahead"] for p in speculative)  # the CPU: nothing to launch ahead of
    assert all(p["tokens_per_round"] >= 1 for p in speculative)


def test_round_timing_script_takes_a_saved_pair(teacher_dir, tmp_path):
    from mambaify.cli import main as cli_main

    assert cli_main(["convert", str(teacher_dir), str(tmp_path / "hybrid"), "--attention", "0.5"]) == 0
    script = [sys.executable, str(REPO / "benchmarks" / "round_timing.py"), "--out", str(tmp_path / "rounds")]
    sizes = ["--batch", "1", "--k", "3", "--new-tokens", "6", "--prompt-tokens", "5", "--repeats", "1"]
    # The teacher drafts for its own converted hybrid: a pair of one tokenizer, from disk.
    result = subprocess.run([*script, *sizes, "--target", str(tmp_path / "hybrid"), "--draft", str(teacher_dir)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads((tmp_path / "rounds" / "round_timing.json").read_text())["points"]
    assert [p["engine"] for p in points] == ["plain"] + ["speculative"] * 4
    result = subprocess.run([*script, *sizes, "--target", str(tmp_path / "hybrid")], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 2 and "--target and --draft go together" in result.stderr


def test_benchmark_compile_flag_compiles_both_engines(tmp_path, monkeypatch):
    """--compile builds the plain engine and the speculative one with compile=True and records
    it per point. compile_step is replaced here (the flag's plumbing is under test, not inductor)."""
    bench = _bench_module()
    compiled_steps = []

    def recorded(step, mode):
        compiled_steps.append(step.__name__)
        return step

    monkeypatch.setattr(engine_module, "compile_step", recorded)
    argv = ["--tiny", "--k", "2", "--batch", "2", "--prompts", "2", "--new-tokens", "6", "--repeats", "1",
            "--verify-k", "2", "--attention", "0.5"]
    for flags in (["--compile"], []):
        out = tmp_path / ("on" if flags else "off")
        assert bench.main([*argv, *flags, "--out", str(out)]) == 0
        points = json.loads((out / "bench_speculative.json").read_text())["end_to_end"]
        assert [(p["path"], p["compiled"]) for p in points] == [("plain", bool(flags)), ("speculative", bool(flags))]
        assert f"| 2 | speculative | 2 | {bool(flags)} |" in (out / "bench_speculative.md").read_text()
        # (b) with --compile times the engines' own compiled decode step and rounds (fused kernel).
        verify = json.loads((out / "bench_speculative.json").read_text())["verify_cost"]
        assert {(p["kernel"], p["compiled"]) for p in verify} == ({("fused", True)} if flags else
                                                                  {("fused", False), ("store_states", False)})
        assert all(p["verify_ms"] > 0 and p["draft_round_ms"] > 0 and p["decode_step_ms"] > 0 for p in verify)
    # Once each with --compile only: (a)'s plain step and rounds, then (b)'s at its one K.
    assert compiled_steps == ["step", "draft_round", "verify_round"] * 2


def test_benchmark_small_batch_linear_flag_reaches_every_engine(tmp_path, monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(engine_module, "compile_step", lambda step, mode: step)
    built = []
    for cls in (Engine, SpeculativeEngine):
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            built.append((type(self).__name__, kwargs.get("small_batch_linear", False)))
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    argv = ["--tiny", "--k", "2", "--batch", "2", "--prompts", "2", "--new-tokens", "6", "--repeats", "1",
            "--verify-k", "2", "--attention", "0.5", "--compile", "--small-batch-linear", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    # (a)'s two engines and (b)'s plain step and rounds, every one with the GEMV.
    assert {name for name, _ in built} == {"Engine", "SpeculativeEngine"} and all(flag for _, flag in built)
    assert json.loads((tmp_path / "bench_speculative.json").read_text())["meta"]["small_batch_linear"] is True


def drafts_of_each_engine(monkeypatch) -> list:
    """The draft of each SpeculativeEngine built from now on, in order."""
    drafts = []
    real_init = SpeculativeEngine.__init__
    monkeypatch.setattr(SpeculativeEngine, "__init__",
                        lambda self, target, draft, *a, **k: drafts.append(draft) or real_init(self, target, draft, *a, **k))
    return drafts


def test_benchmark_draft_int8_flag_quantizes_the_draft_of_both_parts(tmp_path, monkeypatch):
    bench = _bench_module()
    drafts = drafts_of_each_engine(monkeypatch)
    argv = ["--tiny", "--k", "2", "--batch", "1", "--prompts", "1", "--new-tokens", "6", "--repeats", "1",
            "--verify-k", "2", "--attention", "0.5", "--compile", "--draft-int8", "--out", str(tmp_path)]
    monkeypatch.setattr(engine_module, "compile_step", lambda step, mode: step)
    assert bench.main(argv) == 0
    assert len(drafts) == 2 and all(quantize.is_quantized(d) for d in drafts)  # (a)'s engine and (b)'s rounds
    assert json.loads((tmp_path / "bench_speculative.json").read_text())["meta"]["draft_int8"] is True
    assert "the draft's layers in int8" in (tmp_path / "bench_speculative.md").read_text()


def test_benchmark_times_float_and_int8_drafts_side_by_side(tmp_path, monkeypatch):
    """--e2e-draft-weights float,int8: both drafts against one plain engine, the float one left
    as loaded; (b) recomputed from that run takes the acceptance of the draft it timed."""
    bench = _bench_module()
    drafts = drafts_of_each_engine(monkeypatch)
    argv = ["--tiny", "--k", "2", "--batch", "1", "--prompts", "1", "--new-tokens", "6", "--repeats", "1",
            "--verify-k", "2", "--attention", "0.5", "--e2e-draft-weights", "float,int8", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert [quantize.is_quantized(d) for d in drafts[:2]] == [False, True]  # (a)'s float, then int8 draft
    data = json.loads((tmp_path / "bench_speculative.json").read_text())
    speculative = [p for p in data["end_to_end"] if p["path"] == "speculative"]
    assert [p["draft_weights"] for p in speculative] == ["float", "int8"]
    assert all(p["match"] == 1.0 for p in speculative)  # greedy in float32: the target's tokens either way
    assert "| all, int8 |" in (tmp_path / "bench_speculative.md").read_text()

    # Distinct acceptances, so that the filter shows which it took.
    speculative[0]["mean_accepted"], speculative[1]["mean_accepted"] = 1.5, 1.25
    (tmp_path / "bench_speculative.json").write_text(json.dumps(data))
    [float_draft] = bench.acceptances_from(tmp_path / "bench_speculative.json", 2, "float")
    [int8_draft] = bench.acceptances_from(tmp_path / "bench_speculative.json", 2, "int8")
    assert float_draft.at(2) == (1.5, "measured") and int8_draft.at(2) == (1.25, "measured")
    assert "int8 draft" in int8_draft.label
    assert len(bench.acceptances_from(tmp_path / "bench_speculative.json", 2)) == 2  # no filter: both
    with pytest.raises(SystemExit):
        bench.main(["--e2e-draft-weights", "fp4", "--tiny", "--out", str(tmp_path / "x")])


def test_benchmark_takes_the_acceptance_at_each_k_from_an_end_to_end_run(tmp_path):
    """(b)'s speed-up at K takes (a)'s acceptance measured at K; at a K (a) did not run, the
    counts of its rounds at a larger K (min(accepted, K) per round); past them, a fit."""
    bench = _bench_module()
    points = [dict(path="plain", batch=1, k=None),
              dict(path="speculative", batch=8, k=4, mean_accepted=1.75),
              dict(path="speculative", batch=1, k=4, mean_accepted=2.5, accepted_counts={"4": [1, 1, 0, 0, 2]}),
              dict(path="speculative", batch=1, k=2, mean_accepted=1.5),
              dict(path="speculative", batch=1, k="auto", mean_accepted=9.0)]
    path = tmp_path / "bench_speculative.json"
    path.write_text(json.dumps({"end_to_end": points}))
    batch1, batch8 = bench.acceptances_from(path, 4)  # batch 1, then batch 8
    assert batch1.at(4) == (2.5, "measured") and batch1.at(2) == (1.5, "measured")
    # rounds at K = 4 accepting 0, 1, 4, 4: at K = 3 they would have accepted 0, 1, 3, 3
    assert batch1.at(3) == (pytest.approx(7 / 4), "counts")
    assert batch1.at(1) == (pytest.approx(3 / 4), "counts")
    # past every K measured: fitted from the largest below, which it gives back at that K
    accepted, source = batch1.at(6)
    assert source == "fitted" and 2.5 < accepted < 6
    assert bench.Acceptance("x", {4: 2.5}).at(4) == (2.5, "measured")
    fitted_back = bench.tokens_per_round(bench.alpha_for(2.5, 4), 4) - 1
    assert fitted_back == pytest.approx(2.5)
    assert batch8.at(4) == (1.75, "measured") and batch8.at(3)[1] == "fitted"  # no counts recorded
    with pytest.raises(SystemExit, match="K=6"):
        bench.acceptances_from(path, 6)

    # --from-json: (b)'s timings re-rendered with the speed-ups at that acceptance, nothing measured
    costs = [dict(attention=0.5, batch=1, k=k, kernel="fused", verify_ms=7.0, decode_step_ms=6.0,
                  decode_steps_ms=6.0 * (k + 1), verify_over_decode_steps=7 / (6 * (k + 1)), draft_round_ms=3.0)
             for k in (3, 4)]
    saved = tmp_path / "b.json"
    saved.write_text(json.dumps({"meta": {}, "end_to_end": [], "verify_cost": costs, "speedup": [], "skipped": []}))
    out = tmp_path / "rerendered"
    assert bench.main(["--from-json", str(saved), "--accepted-from", str(path), "--out", str(out)]) == 0
    speedups = json.loads((out / "bench_speculative.json").read_text())["speedup"]
    assert [(p["k"], p["accepted_source"]) for p in speedups] == [
        (3, "counts"), (3, "fitted"), (4, "measured"), (4, "measured")]
    assert speedups[2]["speedup"] == pytest.approx(3.5 * 6.0 / (7.0 + 3.0))
    assert speedups[0]["speedup"] == pytest.approx((7 / 4 + 1) * 6.0 / (7.0 + 3.0))
    markdown = (out / "bench_speculative.md").read_text()
    assert "Speed-up over plain decoding" in markdown
    assert "| (a) batch 1: 2.5 at K=4 | 1.65x (1.75+) | 2.10x (2.50) |" in markdown

    # --accepted by hand: one figure at --accepted-k, fitted to the other K
    out = tmp_path / "given"
    assert bench.main(["--from-json", str(saved), "--accepted", "2.5", "--accepted-k", "4", "--out", str(out)]) == 0
    speedups = json.loads((out / "bench_speculative.json").read_text())["speedup"]
    assert [(p["k"], p["accepted_source"]) for p in speedups] == [(3, "fitted"), (4, "measured")]
    assert speedups[1]["speedup"] == pytest.approx(3.5 * 6.0 / (7.0 + 3.0))


def test_speculative_stats_count_each_rounds_accepted_drafts():
    stats = spec.SpeculativeStats()
    stats.observe(3, [0, 3], emitted=5)
    stats.observe(3, [1], emitted=2)
    stats.observe(2, [2, 2], emitted=6)
    assert stats.accepted_counts == {3: [1, 1, 0, 1], 2: [0, 0, 2]}
    assert (stats.rounds, stats.row_rounds, stats.accepted, stats.emitted) == (3, 5, 8, 13)
    assert stats.k_used == {3: 2, 2: 1}
    assert stats.accepted_at(3) == pytest.approx(4 / 3)  # measured at 3
    assert stats.accepted_at(2) == pytest.approx(2.0)  # the rounds at 2 themselves
    assert stats.accepted_at(1) == pytest.approx(1.0)  # from K = 2: min(2, 1) each
    assert stats.accepted_at(4) is None
    assert json.loads(json.dumps(stats.as_dict()))["accepted_counts"] == {"3": [1, 1, 0, 1], "2": [0, 0, 2]}
    # Requests added up (the CLI's totals, the benchmark's over its requests): every count doubled.
    stats.seconds = 0.5
    total = spec.SpeculativeStats().add(stats).add(stats)
    assert total.accepted_counts == {3: [2, 2, 0, 2], 2: [0, 0, 4]} and total.k_used == {3: 4, 2: 2}
    assert (total.rounds, total.row_rounds, total.accepted, total.emitted, total.seconds) == (6, 10, 16, 26, 1.0)
    assert total.mean_accepted == stats.mean_accepted and stats.accepted_counts == {3: [1, 1, 0, 1], 2: [0, 0, 2]}


# ---------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
def test_cuda_graph_rounds_equal_eager(targets, drafts, target_name):
    target = copy.deepcopy(targets[target_name]).cuda()
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids.cuda(), mask.cuda(), 16)
    for draft in (copy.deepcopy(drafts["transformer"]).cuda(), copy.deepcopy(drafts["mamba2"]).cuda()):
        graphed = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=48, use_cuda_graph=True)
        eager = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=48, use_cuda_graph=False)
        assert graphed.launch_ahead  # on CUDA: pinned host reports behind events
        eager.launch_ahead = False  # the host reads each round before launching the next
        assert graphed.prefill_widths and eager.prefill_widths is None  # graphed prefill vs none
        for rows in (slice(0, 4), slice(0, 1)):  # two batch sizes: two sets of graphs
            batch, batch_mask = ids[rows].cuda(), mask[rows].cuda()
            for k in (1, 4, "auto"):
                options = dict(max_new_tokens=16, stop_token_ids=[], k=k)
                tokens = graphed.generate(batch, batch_mask, **options)
                assert torch.equal(tokens, eager.generate(batch, batch_mask, **options))
                assert torch.equal(tokens, expected[rows].cpu())
                if k != "auto":  # a seeded run reproduces at a fixed K
                    sampled = dict(options, temperature=1.0, top_p=0.9, seed=3)
                    assert torch.equal(graphed.generate(batch, batch_mask, **sampled),
                                       eager.generate(batch, batch_mask, **sampled))
        assert graphed.prefill_error is None and set(graphed._prefill_graphs) == {(4, 16), (1, 16)}
        # Replays timed with CUDA events commit nothing: the next request is unchanged.
        times = graphed.measure_rounds(1, 4, repeats=3)
        assert times["draft_ms"] > 0 and times["verify_ms"] > 0
        assert torch.equal(graphed.generate(ids[:1].cuda(), mask[:1].cuda(), max_new_tokens=16, stop_token_ids=[], k=4),
                           expected[:1].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
def test_cuda_small_batch_linear_rounds_equal_plain_greedy(targets, drafts, target_name):
    # float32: the split-K GEMV rounds differently from cuBLAS, far below these models' margins.
    target = copy.deepcopy(targets[target_name]).cuda()
    draft = copy.deepcopy(drafts["transformer"]).cuda()
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids.cuda(), mask.cuda(), 16).cpu()
    engine = SpeculativeEngine(target, draft, k="auto", max_batch_size=4, max_length=48, small_batch_linear=True)
    for k in (1, 4, "auto"):
        tokens = engine.generate(ids.cuda(), mask.cuda(), max_new_tokens=16, stop_token_ids=[], k=k)
        assert torch.equal(tokens, expected), f"k={k}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target_name", ["hybrid50", "mamba2"])
def test_cuda_fold_norms_rounds_equal_plain_greedy(targets, drafts, target_name):
    """The norms and residual adds folded into the GEMVs of every verify call and draft step, in
    CUDA graphs: plain greedy decoding's tokens (float32)."""
    target = copy.deepcopy(targets[target_name]).cuda()
    draft = copy.deepcopy(drafts["transformer"]).cuda()
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids.cuda(), mask.cuda(), 16).cpu()
    engine = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=48, small_batch_linear=True,
                               fold_norms=True)
    assert engine.target_stack.folded_norm is not None
    assert torch.equal(engine.generate(ids.cuda(), mask.cuda(), max_new_tokens=16, stop_token_ids=[]), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["graphed", "compiled"])
def test_cuda_prepared_norms_rounds_equal_plain_greedy(targets, drafts, compile, monkeypatch):
    """MAMBAIFY_PREPARED_NORMS=1: the verify calls' and draft steps' norms at several rows
    prepared by the GEMV before them, in CUDA graphs (and compiled): plain greedy decoding's
    tokens (float32)."""
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "1")
    target = copy.deepcopy(targets["hybrid50"]).cuda()
    draft = copy.deepcopy(drafts["transformer"]).cuda()
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids.cuda(), mask.cuda(), 16).cpu()
    engine = SpeculativeEngine(target, draft, k=3, max_batch_size=4, max_length=48, small_batch_linear=True,
                               fold_norms=True, compile=compile)
    assert all(r.prepare_norms for r in engine.target_stack.layers)
    tokens = engine.generate(ids.cuda(), mask.cuda(), max_new_tokens=16, stop_token_ids=[])
    assert torch.equal(tokens.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper-or-later GPU")
def test_cuda_programmatic_dependent_launch_rounds_equal_plain_greedy(targets, drafts, monkeypatch):
    """MAMBAIFY_PDL=1, compiled, split-K GEMV: every kernel of the rounds launched early and
    waiting for the one ahead gives plain greedy decoding's tokens, in float32."""
    monkeypatch.setenv("MAMBAIFY_PDL", "1")
    torch._dynamo.reset()  # inductor reads the PDL option when it compiles
    target = copy.deepcopy(targets["hybrid50"]).cuda()
    draft = copy.deepcopy(drafts["transformer"]).cuda()
    ids, mask = _prompts(4)
    expected = plain_greedy(target, ids.cuda(), mask.cuda(), 16).cpu()
    engine = SpeculativeEngine(target, draft, k=3, k_choices=(3,), max_batch_size=4, max_length=48,
                               small_batch_linear=True, compile=True)
    tokens = engine.generate(ids.cuda(), mask.cuda(), max_new_tokens=16, stop_token_ids=[])
    assert torch.equal(tokens, expected) and engine.is_compiled(4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_bf16_greedy_matches_plain_engine(targets, drafts):
    """In bfloat16 on the GPU, the graphed speculative engine follows the plain engine's greedy
    decoding (up to bf16 near-ties, so most rows match exactly over 16 tokens)."""
    target = copy.deepcopy(targets["hybrid50"]).cuda().bfloat16()
    draft = copy.deepcopy(drafts["mamba2"]).cuda().bfloat16()
    ids, mask = _prompts(4)
    plain = Engine(target, max_batch_size=4, max_length=48).generate(ids, mask, max_new_tokens=16, stop_token_ids=[])
    engine = SpeculativeEngine(target, draft, k=4, max_batch_size=4, max_length=48)
    tokens = engine.generate(ids, mask, max_new_tokens=16, stop_token_ids=[])
    assert (tokens == plain.cpu()).float().mean() > 0.8
    assert engine.stats.mean_accepted > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("draft_name", ["transformer", "mamba2"])
def test_cuda_compiled_graph_rounds_equal_eager_in_bf16(compile_models, draft_name):
    """The compiled rounds captured in CUDA graphs, against the uncompiled rounds run eagerly, in
    bf16: the Triton verify, decode and split-K attention kernels as custom ops inside inductor's
    graphs, and inductor's fused kernels rounding where eager rounds. Greedy: the same tokens.
    Sampled: both draw from the same uniforms, but a probability that bf16 rounds differently in
    the two can put one draw on the other side of a token's boundary, after which the two rows
    continue from different tokens (on the H200 in session 16 one row of four parted at its 20th
    token); so the first 8 tokens of every row must agree, and three quarters of all of them (a
    round that drew or accepted wrongly would part the rows at once)."""
    target = copy.deepcopy(compile_models["target"]).to("cuda", torch.bfloat16)
    draft = copy.deepcopy(compile_models[draft_name]).to("cuda", torch.bfloat16)
    options = dict(k=2, max_batch_size=4, max_length=48)
    compiled = SpeculativeEngine(target, draft, use_cuda_graph=True, compile=True, **options)
    eager = SpeculativeEngine(target, draft, use_cuda_graph=False, **options)
    ids, mask = (t.cuda() for t in _prompts(4))
    greedy = dict(max_new_tokens=24, stop_token_ids=[])
    sampled = dict(greedy, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(compiled.generate(ids, mask, **greedy), eager.generate(ids, mask, **greedy))
    assert compiled.stats.accepted == eager.stats.accepted
    ours, theirs = compiled.generate(ids, mask, **sampled), eager.generate(ids, mask, **sampled)
    assert torch.equal(ours[:, :8], theirs[:, :8]) and (ours == theirs).float().mean() >= 0.75
    assert compiled.is_compiled(4, 2) and compiled.is_compiled(4, 2, temperature=1.0, top_p=0.9)
    assert compiled.use_cuda_graph and compiled.compile_error is None
