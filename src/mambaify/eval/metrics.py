"""How close a student is to its teacher: perplexity, per-token KL, top-1 agreement, generations."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..distill.data import collate_padded
from ..distill.losses import token_metrics

log = logging.getLogger(__name__)


def _hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return out.last_hidden_state


@torch.no_grad()
def compare_on_documents(
    student,
    teacher,
    docs: Sequence[dict],
    *,
    batch_size: int | None = None,
    pad_id: int = 0,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, float]:
    """Teacher and student on the scored tokens of ``docs`` (loss_mask): perplexities, KL, agreement.

    batch_size: documents per forward pass; default 8 on the CPU, 32 on a GPU (where a small
    model's forward costs its kernel launches more than its tokens)."""
    device = next(student.parameters()).device
    batch_size = batch_size or (8 if device.type == "cpu" else 32)
    totals = {"kl": 0.0, "agree": 0.0, "student_nll": 0.0, "teacher_nll": 0.0}
    n_tokens = 0
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]["input_ids"]))  # less padding
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        batch = collate_padded([docs[i] for i in idx], pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        m = token_metrics(
            _hidden(student, batch),
            _hidden(teacher, batch),
            batch["input_ids"],
            batch["loss_mask"],
            student_head=student.lm_head,
            teacher_head=teacher.lm_head,
        )
        for key in totals:
            totals[key] += float(m[key].double().sum())
        n_tokens += int(m["n_tokens"])
    n = max(n_tokens, 1)
    return {
        "tokens": n_tokens,
        "student_ppl": math.exp(totals["student_nll"] / n),
        "teacher_ppl": math.exp(totals["teacher_nll"] / n),
        "kl": totals["kl"] / n,
        "top1_agreement": totals["agree"] / n,
    }


@torch.no_grad()
def greedy_generations(
    models: dict[str, torch.nn.Module],
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
) -> list[dict[str, str]]:
    """Greedy answers of each model to each chat prompt, for reading side by side.

    All prompts in one batch through mambaify's Engine where it serves the model (left padding
    changes no row's tokens; on a GPU the decode step is a CUDA graph), else one by one through
    transformers' generate."""
    from ..generate.engine import engine_if_served

    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]
    answers: dict[str, list[str]] = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        engine = engine_if_served(model, len(prompts), max(ids.shape[1] for ids in encoded) + max_new_tokens)
        if engine is not None:
            stop = set(engine.stop_token_ids)
            try:
                out = engine.generate([ids[0].tolist() for ids in encoded], max_new_tokens=max_new_tokens).tolist()
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # the report must not fail on the fast path: generate below
                log.warning("report generations: the Engine failed (%s); transformers' generate instead", err)
                out = None
            if out is not None:
                cut = [next((i for i, t in enumerate(row) if t in stop), len(row)) for row in out]
                answers[name] = [tokenizer.decode(row[:end], skip_special_tokens=True).strip()
                                 for row, end in zip(out, cut)]
                continue
        answers[name] = []
        for ids in encoded:
            out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers[name].append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return [{"prompt": p, **{name: answers[name][i] for name in models}} for i, p in enumerate(prompts)]


__all__ = ["compare_on_documents", "greedy_generations"]
