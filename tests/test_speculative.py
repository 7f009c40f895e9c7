"""Speculative decoding (PAPER.md section 3), CPU reference: greedy equals plain greedy, the Mamba
verify step (one checkpoint + replayed inputs) equals sequential decoding, and sampling keeps the
target's distribution while a wrong acceptance rule is caught."""

from __future__ import annotations

import pytest
import torch

import mambaify
from mambaify.generate.speculative import (
    _probs,
    accept_greedy,
    accept_rejection,
    fold_pending,
    mamba_prefill,
    mamba_verify,
    propose_draft,
    speculative_generate,
    target_commit,
    target_prefill,
    target_verify,
)
from mambaify.models.cache import MambaLayerCache
from tests.conftest import tiny_teacher


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine are ~30x slower with 2 threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama")


@pytest.fixture(scope="module")
def draft():
    return tiny_teacher("llama", seed=1)  # same vocabulary, different random weights


def _target(teacher, attention: float):
    model = mambaify.convert(teacher, attention=attention).eval()
    model.generation_config.eos_token_id = None  # compare fixed lengths: no EOS stopping
    return model


def _prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (width 7)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 97, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 3, 5][:batch]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Greedy: token for token the target's own greedy decoding


@pytest.mark.parametrize("attention", [0.5, 0.0], ids=["hybrid50", "mamba2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_plain_greedy(teacher, draft, attention, batch):
    target = _target(teacher, attention)
    ids, mask = _prompts(batch)
    new = 10
    with torch.no_grad():
        expected = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    expected = expected[:, ids.shape[1] :]
    for k in range(1, 7):
        tokens, stats = speculative_generate(target, draft, ids, mask, max_new_tokens=new, k=k)
        assert torch.equal(tokens, expected), f"k={k}"
        assert 0 <= stats.mean_accepted <= k
    # The target as its own draft: every draft token is accepted.
    for k in (1, 4):
        tokens, stats = speculative_generate(target, target, ids, mask, max_new_tokens=new, k=k)
        assert torch.equal(tokens, expected)
        assert stats.mean_accepted == k and stats.tokens_per_step == k + 1


# ---------------------------------------------------------------------------------------------
# The Mamba verify step against sequential decoding


def _sequential(mixer, hidden):
    """Token-by-token decoding with the mixer's own cache: outputs (b,t,d), and after each token
    the SSM state and conv state."""
    cache = MambaLayerCache()
    outs, ssm, conv = [], [], []
    for i in range(hidden.shape[1]):
        outs.append(mixer(hidden[:, i : i + 1], None, None, cache))
        ssm.append(cache.ssm_state.clone())
        conv.append(cache.conv_state.clone())
    return torch.cat(outs, 1), ssm, conv


@pytest.mark.parametrize(
    "accepted", [[1, 1, 1], [5, 5, 5], [1, 5, 3]], ids=["all-rejected", "all-accepted", "mixed"]
)
def test_mamba_verify_equals_sequential(teacher, accepted):
    """Round 1 verifies K+1 = 5 tokens of which row b keeps accepted[b] (the rest are junk draft
    tokens); round 2 replays them into the checkpoint and verifies the row's true continuation."""
    torch.manual_seed(0)
    mixer = _target(teacher, 0.0).model.layers[1].mamba
    b, prompt, k = 3, 4, 4
    stream = torch.randn(b, prompt + 2 * (k + 1), 64)
    with torch.no_grad():
        seq_out, seq_ssm, seq_conv = _sequential(mixer, stream)
        _, state = mamba_prefill(mixer, stream[:, :prompt], torch.ones(b, prompt, dtype=torch.long))

        counts = torch.tensor(accepted)
        junk = torch.randn(b, k + 1, 64)
        keep = torch.arange(k + 1)[None, :, None] < counts[:, None, None]
        round1 = torch.where(keep, stream[:, prompt : prompt + k + 1], junk)
        out1 = mamba_verify(mixer, round1, state, torch.zeros(b, dtype=torch.long))
        for row, n in enumerate(accepted):
            torch.testing.assert_close(out1[row, :n], seq_out[row, prompt : prompt + n])

        round2 = torch.stack([stream[row, prompt + n : prompt + n + k + 1] for row, n in enumerate(accepted)])
        out2 = mamba_verify(mixer, round2, state, counts)
        for row, n in enumerate(accepted):
            done = prompt + n  # tokens folded into the checkpoint
            torch.testing.assert_close(state.checkpoint[row], seq_ssm[done - 1][row])
            torch.testing.assert_close(state.window[row, : mixer.d_conv - 1], seq_conv[done - 1][row].T)
            torch.testing.assert_close(out2[row], seq_out[row, done : done + k + 1])


def _full_forward(model, rows: list[list[int]]):
    """The target run from scratch on left-padded rows: (logits, cache)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.logits, getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("attention", [0.5, 0.0], ids=["hybrid50", "mamba2"])
def test_target_rounds_equal_full_forward(teacher, draft, attention):
    """Whole-model check over several rounds where rows accept different counts: every verify
    call's logits equal a from-scratch forward, and after folding, each Mamba checkpoint equals
    the state a from-scratch forward over the committed tokens reaches (the greedy test alone
    is too coarse to see small state errors in a random tiny model)."""
    target = _target(teacher, attention)
    ids, mask = _prompts(4)
    k = 3
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]  # committed, then the unfed last token
    seen = set()
    with torch.no_grad():
        state = target_prefill(target, ids[:, :-1], mask[:, :-1], capacity=64)
        last = ids[:, -1]
        for _ in range(4):
            drafts, _ = propose_draft(draft, rows, k, False, 1.0, torch.Generator())
            # Make some drafts right, so that rows accept different counts.
            drafts[1:3, 0] = _full_forward(target, rows)[0][1:3, -1].argmax(-1)
            logits = target_verify(target, torch.cat([last[:, None], drafts], 1), state)
            full, _ = _full_forward(target, [r + d for r, d in zip(rows, drafts.tolist())])
            torch.testing.assert_close(logits, full[:, -(k + 1):], atol=1e-4, rtol=1e-4)
            accepted, last = accept_greedy(drafts, logits)
            seen.update(accepted.tolist())
            target_commit(state, accepted + 1)
            rows = [r + d[:n] + [t] for r, d, n, t in zip(rows, drafts.tolist(), accepted.tolist(), last.tolist())]
        fold_pending(target, state)
        _, cache = _full_forward(target, [r[:-1] for r in rows])
    assert len(seen) > 1
    for i, layer_state in enumerate(state.layers):
        if i not in target.config.attn_layers:
            torch.testing.assert_close(layer_state.checkpoint, cache.mamba_layer(i).ssm_state, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling: the output is distributed as the target's


V = 8
SMALL = dict(vocab_size=V, num_hidden_layers=2, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def small_pair():
    """A 2-layer hybrid over 8 tokens and a draft that disagrees with it (TV about 0.5 over the
    first two tokens, so that both acceptance and rejection are frequent)."""
    target = mambaify.convert(tiny_teacher("llama", **SMALL), attention=0.5).eval()
    return target, tiny_teacher("llama", seed=1, **SMALL)


def _exact_two_tokens(model, prompt: torch.Tensor) -> torch.Tensor:
    """P(t1, t2 | prompt) (V, V) at temperature 1, by full forward passes."""
    with torch.no_grad():
        p1 = _probs(model(prompt[None]).logits[0, -1], 1.0)
        seqs = torch.cat([prompt[None].expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = _probs(model(seqs).logits[:, -1], 1.0)
    return p1[:, None] * p2


def _chi_square(samples: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the (t1, t2) counts; cells expecting < 5 are pooled into one."""
    n = samples.shape[0]
    counts = torch.zeros(V * V, dtype=torch.float64)
    counts.index_add_(0, samples[:, 0] * V + samples[:, 1], torch.ones(n, dtype=torch.float64))
    e = expected.flatten() * n
    small = e < 5
    e = torch.cat([e[~small], e[small].sum()[None]])
    o = torch.cat([counts[~small], counts[small].sum()[None]])
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


def _always_accept(drafts, logits, q, temperature, generator):
    """A wrong rule: keep every draft token, then sample the target's next token."""
    b, k = drafts.shape
    return torch.full((b,), k), torch.multinomial(_probs(logits[:, k], temperature), 1, generator=generator)[:, 0]


def _resample_from_p(drafts, logits, q, temperature, generator):
    """A subtler wrong rule: the right acceptance test, but on rejection sample from p, not from
    normalize(max(0, p - q))."""
    accepted, _ = accept_rejection(drafts, logits, q, temperature, generator)
    p = _probs(logits, temperature)[torch.arange(len(accepted)), accepted]
    return accepted, torch.multinomial(p, 1, generator=generator)[:, 0]


@pytest.mark.parametrize(
    "rule, k, ok",
    [(None, 2, True), (None, 1, True), (_always_accept, 2, False), (_resample_from_p, 1, False)],
    ids=["rejection-k2", "rejection-k1", "always-accept", "resample-from-p"],
)
def test_sampling_preserves_target_distribution(small_pair, rule, k, ok):
    """3000 independent rows (one batch, one seed) sample 2 tokens each; the rejection rule must
    pass a chi-square bound (df + 6 sd, so a false alarm is very unlikely) and the wrong rules fail it."""
    target, draft = small_pair
    prompt = torch.tensor([5])  # one token: the first verify call holds the whole prompt
    rows = 3000
    tokens, stats = speculative_generate(
        target, draft, prompt[None].expand(rows, -1), max_new_tokens=2, k=k, do_sample=True, seed=k, acceptance=rule
    )
    stat, df = _chi_square(tokens, _exact_two_tokens(target, prompt))
    bound = df + 6 * (2 * df) ** 0.5
    assert (stat < bound) == ok, f"chi2={stat:.1f} df={df} bound={bound:.1f}"
    if rule is None:
        assert 0 < stats.mean_accepted < k  # both acceptance and rejection happened
