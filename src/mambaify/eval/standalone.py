"""``mambaify eval MODEL --teacher T``: the run's before/after evaluation, on any saved model,
and with ``--tasks`` lm-evaluation-harness tasks on both (:mod:`.harness`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from ..distill import data as D
from ..fileio import write_json_atomic
from .harness import check_tasks, harness_scores, scores_plot, scores_table
from .report import evaluate_pair


def evaluate_model(model_path: str, teacher_name: str, *, out: str | None = None, num_texts: int = 64,
                   num_chats: int = 16, num_generations: int = 3, device: str = "auto",
                   tasks: list[str] | None = None, tasks_limit: int | None = None, tasks_fewshot: int | None = None,
                   tasks_include: str | None = None, tasks_batch_size: int = 8) -> Path:
    """Write ``report.md`` and ``metrics.json`` (default under ``MODEL/eval``); returns the report's path.

    ``tasks``: lm-eval task names, each run on the teacher and on the model (``tasks_limit``
    documents per task, ``tasks_fewshot`` examples in each prompt, extra task YAML files in
    ``tasks_include``).
    """
    from ..teachers import load_teacher

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder {model_path} not found")
    if tasks_limit is not None and tasks_limit <= 0:
        raise ValueError(f"--tasks-limit must be positive, got {tasks_limit}")
    manager = check_tasks(tasks, tasks_include) if tasks else None  # before the slow loads
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
    if tasks:
        options = dict(limit=tasks_limit, num_fewshot=tasks_fewshot, batch_size=tasks_batch_size, task_manager=manager)
        result["tasks"] = {"options": {"tasks": tasks, "limit": tasks_limit, "num_fewshot": tasks_fewshot},
                           "teacher": harness_scores(teacher, tokenizer, tasks, **options),
                           "model": harness_scores(student, tokenizer, tasks, **options)}
    write_json_atomic(out_dir / "metrics.json", result)
    lines = ["# mambaify eval", "", f"Model `{model_path}` against teacher `{teacher_name}`.", "",
             "| data | tokens | teacher ppl | model ppl | KL(teacher‖model) | top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    for part in ("text", "chat"):
        if part in result:
            r = result[part]
            lines.append(f"| {part} | {r['tokens']} | {r['teacher_ppl']:.4g} | {r['student_ppl']:.4g} | {r['kl']:.4g} | {r['top1_agreement']:.4g} |")
    if tasks:
        scores = result["tasks"]
        shots = f"{tasks_fewshot}-shot" if tasks_fewshot else "zero-shot"
        limited = f", the first {tasks_limit} documents of each task" if tasks_limit else ""
        lines += ["", f"## lm-evaluation-harness ({shots}{limited})", ""]
        lines += scores_table(scores["teacher"], scores["model"])
        image = scores_plot(out_dir, scores["teacher"], scores["model"])
        if image:
            lines += ["", f"![{image}]({image})"]
    for g in result.get("generations", []):
        lines += ["", f"**Prompt:** {g['prompt']}", "", f"- teacher: {g['teacher']!r}", f"- model: {g['student']!r}"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"
