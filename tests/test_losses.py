"""Masked per-token KL/CE against direct float64 computations; chunked and hidden-state paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambaify.distill.losses import distill_loss, distill_loss_from_hidden, token_metrics

B, T, V, H = 3, 9, 13, 8


def _batch(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    teacher = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.randint(0, 2, (B, T), generator=g)
    mask[2] = 0
    mask[2, 4] = 1  # rows with very different token counts: per-token, not per-row, averaging
    mask[0, 1:] = 1
    return student, teacher, targets, mask


def _reference(student, teacher, targets, mask, temperature, reverse):
    """Token by token in float64: logits at t - 1 score token t where mask[t] == 1."""
    kl_sum = ce_sum = 0.0
    n = 0
    for b in range(B):
        for t in range(1, T):
            if not mask[b, t]:
                continue
            zs, zt = student[b, t - 1].double().tolist(), teacher[b, t - 1].double().tolist()

            def log_softmax(z, tau):
                m = max(x / tau for x in z)
                lse = m + math.log(sum(math.exp(x / tau - m) for x in z))
                return [x / tau - lse for x in z]

            ls, lt = log_softmax(zs, temperature), log_softmax(zt, temperature)
            if reverse:
                kl = sum(math.exp(a) * (a - c) for a, c in zip(ls, lt))
            else:
                kl = sum(math.exp(c) * (c - a) for a, c in zip(ls, lt))
            kl_sum += temperature**2 * kl
            ce_sum -= log_softmax(zs, 1.0)[targets[b, t]]
            n += 1
    return kl_sum / n, ce_sum / n, n


def _plain(student, teacher, targets, mask, temperature, reverse, kl_weight, ce_weight):
    """Unchunked float64 formula, for gradients."""
    s, t = student[:, :-1].double(), teacher[:, :-1].double()
    m = mask[:, 1:].bool()
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = ((ls.exp() * (ls - lt)) if reverse else (lt.exp() * (lt - ls))).sum(-1) * temperature**2
    ce = -F.log_softmax(s, -1).gather(-1, targets[:, 1:, None]).squeeze(-1)
    return (kl_weight * kl[m].sum() + ce_weight * ce[m].sum()) / m.sum()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_matches_direct_float64_computation(reverse, temperature, chunk_size):
    student, teacher, targets, mask = _batch()
    kl, ce, n = _reference(student, teacher, targets, mask, temperature, reverse)
    out = distill_loss(student, teacher, targets, mask, kl_weight=0.3, ce_weight=1.7,
                       temperature=temperature, reverse=reverse, chunk_size=chunk_size)
    assert out["n_tokens"] == n == int(mask[:, 1:].sum())
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.3 * kl + 1.7 * ce, rel=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_plain_formula(reverse):
    student, teacher, targets, mask = _batch(1)
    s1 = student.clone().requires_grad_()
    distill_loss(s1, teacher, targets, mask, kl_weight=0.5, ce_weight=1.0, temperature=2.0,
                 reverse=reverse, chunk_size=5)["loss"].backward()
    s2 = student.double().requires_grad_()
    _plain(s2, teacher, targets, mask, 2.0, reverse, 0.5, 1.0).backward()
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=1e-5, atol=1e-7)
    # Positions whose next token is not a target get no gradient at all.
    unscored = torch.cat([~mask[:, 1:].bool(), torch.ones(B, 1, dtype=torch.bool)], 1)
    assert (s1.grad[unscored] == 0).all()


def test_masked_positions_do_not_matter():
    student, teacher, targets, mask = _batch(2)
    out = distill_loss(student, teacher, targets, mask, ce_weight=1.0)
    noise = torch.randn(B, T, V) * 100
    keep = torch.cat([mask[:, 1:].bool(), torch.zeros(B, 1, dtype=torch.bool)], 1)[..., None]
    targets2 = torch.where(mask.bool(), targets, (targets + 1) % V)
    out2 = distill_loss(torch.where(keep, student, noise), torch.where(keep, teacher, noise),
                        targets2, mask, ce_weight=1.0)
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_hidden_state_path_equals_logits_path():
    g = torch.Generator().manual_seed(3)
    _, _, targets, mask = _batch(3)
    hs, ht = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    ws, wt = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    kw = dict(kl_weight=0.7, ce_weight=0.4, temperature=1.5)

    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = distill_loss(hs1 @ ws1.T, ht @ wt.T, targets, mask, **kw)
    ref["loss"].backward()

    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ht2, wt2 = ht.clone().requires_grad_(), wt.clone().requires_grad_()
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(wt)
    out = distill_loss_from_hidden(hs2, ws2, ht2, head, targets, mask, chunk_size=3, **kw)
    out["loss"].backward()

    for key in ("loss", "kl", "ce"):
        assert out[key].item() == pytest.approx(ref[key].item(), rel=1e-5)
    torch.testing.assert_close(hs2.grad, hs1.grad)
    torch.testing.assert_close(ws2.grad, ws1.grad)
    assert ht2.grad is None and wt2.grad is None and head.weight.grad is None  # teacher is constant


def test_chunks_bound_saved_memory():
    """Autograd keeps only model-dtype inputs per chunk, never full-vocabulary float32 logits."""
    n_pos, hidden, vocab = 64, 16, 4096
    h = torch.randn(1, n_pos, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (1, n_pos))
    mask = torch.ones(1, n_pos, dtype=torch.long)
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = distill_loss_from_hidden(h, w, h.detach(), w.detach(), targets, mask, ce_weight=1.0, chunk_size=8)
    assert out["loss"].dtype == torch.float32
    full_fp32_logits = n_pos * vocab * 4
    assert sum(saved) < full_fp32_logits / 4
    out["loss"].backward()
    assert h.grad is not None and torch.isfinite(h.grad.float()).all()


def test_num_tokens_empty_mask_and_validation():
    student, teacher, targets, mask = _batch(4)
    base = distill_loss(student, teacher, targets, mask, ce_weight=1.0)
    scaled = distill_loss(student, teacher, targets, mask, ce_weight=1.0, num_tokens=1000)
    assert scaled["loss"].item() == pytest.approx(base["loss"].item() * base["n_tokens"] / 1000, rel=1e-6)

    s = student.clone().requires_grad_()
    empty = distill_loss(s, teacher, targets, torch.zeros_like(mask), ce_weight=1.0)
    assert empty["n_tokens"] == 0 and empty["loss"].item() == 0.0
    empty["loss"].backward()
    assert (s.grad == 0).all()

    ce_only = distill_loss(student, None, targets, mask, kl_weight=0.0, ce_weight=1.0)
    assert ce_only["loss"].item() == pytest.approx(base["ce"].item(), rel=1e-6) and math.isnan(ce_only["kl"])
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(student, None, targets, mask)
    with pytest.raises(ValueError, match="loss_mask"):
        distill_loss(student[:, :-1], teacher, targets, mask)


def test_teacher_with_impossible_tokens():
    student, teacher, targets, mask = _batch(5)
    teacher[..., 0] = float("-inf")  # a teacher that never emits token 0
    out = distill_loss(student, teacher, targets, mask)
    kl, _, _ = _reference(student, teacher.clamp_min(-1e4), targets, mask, 1.0, False)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)


def test_token_metrics():
    student, teacher, targets, mask = _batch(6)
    teacher[0, 2] = student[0, 2] * 3  # same argmax at one scored position at least
    m = token_metrics(student, teacher, targets, mask, chunk_size=4)
    scored = mask[:, 1:].bool()
    s, t = student[:, :-1][scored], teacher[:, :-1][scored]
    tgt = targets[:, 1:][scored]
    agree = s.argmax(-1) == t.argmax(-1)
    assert m["n_tokens"] == len(tgt) and torch.equal(m["agree"], agree)
    assert m["top1_agreement"] == pytest.approx(agree.float().mean().item())
    kl, _, _ = _reference(student, teacher, targets, mask, 1.0, False)
    assert m["mean_kl"] == pytest.approx(kl, rel=1e-5)
    torch.testing.assert_close(m["student_nll"], F.cross_entropy(s, tgt, reduction="none"))
    torch.testing.assert_close(m["teacher_nll"], F.cross_entropy(t, tgt, reduction="none"))
    empty = token_metrics(student, teacher, targets, torch.zeros_like(mask))
    assert empty["n_tokens"] == 0 and math.isnan(empty["top1_agreement"])
