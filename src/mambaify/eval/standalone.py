"""``mambaify eval MODEL --teacher T``: the run's before/after evaluation, on any saved model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from ..distill import data as D
from ..fileio import write_json_atomic
from .report import evaluate_pair


def evaluate_model(model_path: str, teacher_name: str, *, out: str | None = None, num_texts: int = 64,
                   num_chats: int = 16, num_generations: int = 3, device: str = "auto") -> Path:
    from ..teachers import load_teacher

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder {model_path} not found")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    teacher, tokenizer = load_teacher(teacher_name, dtype=dtype, device=str(dev))
    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(dev).eval()
    out_dir = Path(out) if out else Path(model_path) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    # Held-out titles: every distillation run draws its prompts from the train split.
    prompts = D.wiki_prompts(num_chats + num_generations, seed=12345, split="heldout")
    chat_path = out_dir / "heldout_labels.jsonl"
    D.generate_pseudo_labels(teacher, tokenizer, prompts[:num_chats], chat_path, max_new_tokens=96, batch_size=16)
    run_data = SimpleNamespace(
        eval_text_docs=[D.tokenize_text(tokenizer, t, max_length=512) for t in D.wiki_heldout_texts(num_texts)],
        eval_chat_docs=D.tokenize_records(tokenizer, D.load_source(chat_path), max_length=512),
        eval_prompts=prompts[num_chats:],
    )
    cfg = SimpleNamespace(progress=True, eval_max_new_tokens=40)
    result = evaluate_pair(student, teacher, tokenizer, run_data, cfg)
    write_json_atomic(out_dir / "metrics.json", result)
    lines = ["# mambaify eval", "", f"Model `{model_path}` against teacher `{teacher_name}`.", "",
             "| data | tokens | teacher ppl | model ppl | KL(teacher‖model) | top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    for part in ("text", "chat"):
        if part in result:
            r = result[part]
            lines.append(f"| {part} | {r['tokens']} | {r['teacher_ppl']:.4g} | {r['student_ppl']:.4g} | {r['kl']:.4g} | {r['top1_agreement']:.4g} |")
    for g in result.get("generations", []):
        lines += ["", f"**Prompt:** {g['prompt']}", "", f"- teacher: {g['teacher']!r}", f"- model: {g['student']!r}"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"
