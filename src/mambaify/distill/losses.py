"""Distillation losses: masked, per-token KL and cross-entropy in bounded memory.

Alignment, handled once in :func:`_select`: ``logits[:, t]`` predicts token ``t + 1``.
``targets`` and ``loss_mask`` are labels-style, i.e. unshifted and aligned with ``input_ids``
(pass the batch's ``input_ids`` as ``targets``): ``loss_mask[:, t] == 1`` scores token
``targets[:, t]`` against the logits at position ``t - 1``. ``loss_mask[:, 0]`` is ignored.

Every term is summed over the scored tokens and divided by their number (or by
``num_tokens``), never by the batch size; prompt, padding and document-boundary positions
carry ``loss_mask == 0`` and count for nothing.

Memory: the scored positions are gathered first, then processed ``chunk_size`` rows at a time,
each chunk upcast to float32 and run under activation checkpointing, so only one chunk's
float32 ``[chunk, V]`` tensors are alive at once, in the forward and in the backward pass.
Given final hidden states and LM-head weights instead of logits, not even the model-dtype
``[B, T, V]`` logits are ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Head = Tensor | nn.Linear | None


def _select(x: Tensor, loss_mask: Tensor) -> Tensor:
    """Rows of ``x`` ([B, T, D]) at the positions whose *next* token is a target -> [N, D]."""
    b, t = loss_mask.shape
    if x.shape[:2] != (b, t):
        raise ValueError(f"expected [B, T, ...] = [{b}, {t}, ...] to match loss_mask, got {list(x.shape)}")
    scored = loss_mask[:, 1:].bool()
    flat = (torch.arange(b, device=x.device)[:, None] * t + torch.arange(t - 1, device=x.device))[scored.to(x.device)]
    return x.reshape(b * t, -1).index_select(0, flat)


def _split_head(head: Head) -> tuple[Tensor, Tensor | None] | None:
    if head is None:
        return None
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    return head, None


def _logits(rows: Tensor, head: tuple[Tensor, Tensor | None] | None) -> Tensor:
    # The head runs in the model's dtype, as the model's forward would; the softmax in float32.
    return (rows if head is None else F.linear(rows, *head)).float()


def _kl_rows(s_logits: Tensor, t_logits: Tensor, temperature: float, reverse: bool) -> Tensor:
    """Per-row KL at temperature T, times T^2 (keeps gradient scale independent of T)."""
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    if reverse:  # KL(p_student || p_teacher)
        p, log_p, log_q = s_logp.exp(), s_logp, t_logp
    else:  # KL(p_teacher || p_student)
        p, log_p, log_q = t_logp.exp(), t_logp, s_logp
    # 0 * log 0 = 0: a teacher may put -inf on tokens it never emits.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), device=p.device))
    return terms.sum(-1) * temperature**2


class _Chunker:
    """Per-chunk sums of the loss terms; the pieces shared by the loss and the metrics."""

    def __init__(self, student: Tensor, teacher: Tensor | None, targets: Tensor, loss_mask: Tensor,
                 student_head: Head, teacher_head: Head, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if targets.shape != loss_mask.shape:
            raise ValueError(f"targets {list(targets.shape)} and loss_mask {list(loss_mask.shape)} differ")
        self.s_head, self.t_head = _split_head(student_head), _split_head(teacher_head)
        self.student = _select(student, loss_mask)
        with torch.no_grad():
            self.teacher = None if teacher is None else _select(teacher, loss_mask).detach()
        self.targets = targets[:, 1:][loss_mask[:, 1:].bool()].to(student.device)
        self.n = self.targets.numel()
        self.bounds = [(s, min(s + chunk_size, self.n)) for s in range(0, self.n, chunk_size)]

    def teacher_logits(self, s: int, e: int) -> Tensor:
        with torch.no_grad():
            return _logits(self.teacher[s:e], self.t_head)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    loss_mask: Tensor,
    *,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    reverse: bool = False,
    chunk_size: int = 1024,
    num_tokens: int | float | None = None,
    student_head: Head = None,
    teacher_head: Head = None,
) -> dict[str, Tensor | int]:
    """``kl_weight * KL + ce_weight * CE``, averaged per scored token.

    KL is KL(p_teacher || p_student) (``reverse``: KL(p_student || p_teacher)) at
    ``temperature``, scaled by T^2; CE is the student's cross-entropy on ``targets`` at T=1.
    Paper defaults: stage 1 ``ce_weight=1, kl_weight=0.1``; end-to-end stage ``kl_weight=1,
    ce_weight=0``. ``num_tokens`` replaces the local token count as the divisor (pass the
    count of the whole accumulated/distributed batch so every token weighs the same).

    With ``student_head``/``teacher_head`` (a weight ``[V, H]`` or an ``nn.Linear``) the first
    two arguments are final hidden states ``[B, T, H]`` and logits are made chunk by chunk.
    Gradients reach the student only; teacher inputs are treated as constants.

    Returns ``loss`` (differentiable), ``kl`` and ``ce`` (detached per-token means; KL
    including the T^2 factor, so ``loss == kl_weight * kl + ce_weight * ce`` without
    ``num_tokens``) and ``n_tokens`` (int). ``kl`` is computed whenever a teacher is given.
    """
    if kl_weight and teacher_logits is None:
        raise ValueError("kl_weight > 0 needs teacher logits (or teacher hidden states and teacher_head)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    c = _Chunker(student_logits, teacher_logits, targets, loss_mask, student_head, teacher_head, chunk_size)
    want_kl = c.teacher is not None

    def chunk_sums(rows: Tensor, s: int, e: int) -> Tensor:
        # Under checkpointing this runs again in the backward pass, teacher logits included:
        # one more [chunk, H] x [H, V] matmul buys never holding them all.
        logits = _logits(rows, c.s_head)
        # A term with weight 0 is only logged: keep it out of the backward pass.
        for_kl, for_ce = (logits if kl_weight else logits.detach()), (logits if ce_weight else logits.detach())
        kl = _kl_rows(for_kl, c.teacher_logits(s, e), temperature, reverse).sum() if want_kl else logits.new_zeros(())
        ce = F.cross_entropy(for_ce, c.targets[s:e], reduction="sum")
        return torch.stack([kl, ce])

    needs_grad = torch.is_grad_enabled() and (
        c.student.requires_grad or any(p.requires_grad for p in (c.s_head or ()) if p is not None))
    sums = c.student.new_zeros(2, dtype=torch.float32)
    for s, e in c.bounds:
        rows = c.student[s:e]
        # Checkpointing keeps only the (model-dtype) input rows of each chunk for the backward
        # pass and rebuilds its float32 logits then, so memory stays at one chunk's worth.
        part = checkpoint(chunk_sums, rows, s, e, use_reentrant=False) if needs_grad else chunk_sums(rows, s, e)
        sums = sums + part
    n = c.n
    divisor = float(num_tokens) if num_tokens is not None else max(n, 1)
    loss = sums.new_zeros(())
    if want_kl and kl_weight:
        loss = loss + kl_weight * sums[0]
    if ce_weight:
        loss = loss + ce_weight * sums[1]
    loss = loss / divisor
    if needs_grad and not loss.requires_grad:  # no tokens or zero weights: backward must still work
        loss = loss + c.student.sum() * 0.0
    means = sums.detach() / max(n, 1)
    return {"loss": loss, "kl": means[0] if want_kl else means.new_tensor(float("nan")), "ce": means[1], "n_tokens": n}


def distill_loss_from_hidden(
    student_hidden: Tensor,
    student_head: Tensor | nn.Linear,
    teacher_hidden: Tensor | None,
    teacher_head: Tensor | nn.Linear | None,
    targets: Tensor,
    loss_mask: Tensor,
    **kwargs,
) -> dict[str, Tensor | int]:
    """:func:`distill_loss` from final hidden states and LM heads, never building ``[B, T, V]``."""
    return distill_loss(student_hidden, teacher_hidden, targets, loss_mask,
                        student_head=student_head, teacher_head=teacher_head, **kwargs)


@torch.no_grad()
def token_metrics(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_head: Head = None,
    teacher_head: Head = None,
) -> dict[str, Tensor | int | float]:
    """Evaluation helpers over the scored tokens (same alignment and inputs as distill_loss).

    Per-token tensors of length N: ``kl`` (forward KL(p_teacher || p_student) at
    ``temperature``), ``agree`` (student and teacher argmax equal), ``student_nll`` and
    ``teacher_nll`` (of the target token). Summaries: ``top1_agreement``, ``mean_kl``,
    ``n_tokens``. Sum the per-token tensors across batches to aggregate.
    """
    c = _Chunker(student_logits, teacher_logits, targets, loss_mask, student_head, teacher_head, chunk_size)
    parts: dict[str, list[Tensor]] = {"kl": [], "agree": [], "student_nll": [], "teacher_nll": []}
    for s, e in c.bounds:
        s_logits, t_logits = _logits(c.student[s:e], c.s_head), c.teacher_logits(s, e)
        tgt = c.targets[s:e]
        parts["kl"].append(_kl_rows(s_logits, t_logits, temperature, reverse=False))
        parts["agree"].append(s_logits.argmax(-1) == t_logits.argmax(-1))
        parts["student_nll"].append(F.cross_entropy(s_logits, tgt, reduction="none"))
        parts["teacher_nll"].append(F.cross_entropy(t_logits, tgt, reduction="none"))
    device = c.student.device
    out: dict[str, Tensor | int | float] = {
        k: torch.cat(v) if v else torch.zeros(0, device=device, dtype=torch.bool if k == "agree" else torch.float32)
        for k, v in parts.items()
    }
    out["n_tokens"] = c.n
    out["top1_agreement"] = out["agree"].float().mean().item() if c.n else float("nan")
    out["mean_kl"] = out["kl"].mean().item() if c.n else float("nan")
    return out
