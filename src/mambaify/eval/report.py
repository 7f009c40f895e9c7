"""Evaluation of a student against its teacher, and the run report (Markdown, JSON, plots)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .metrics import compare_on_documents, greedy_generations

log = logging.getLogger(__name__)


def evaluate_pair(student, teacher, tokenizer, run_data, cfg, desc: str = "eval") -> dict[str, Any]:
    """Perplexity on held-out real text, KL / top-1 agreement on held-out teacher responses,
    and greedy generations side by side."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: dict[str, Any] = {}
    # Timed per part (logged with -v): on a GPU each part can first wait for kernels to compile.
    start = time.perf_counter()
    if run_data.eval_text_docs:
        result["text"] = compare_on_documents(student, teacher, run_data.eval_text_docs, pad_id=pad_id,
                                              desc=f"{desc}: held-out text", progress=cfg.progress)
        log.info("%s: held-out text in %.1f s", desc, time.perf_counter() - start)
    if run_data.eval_chat_docs:
        start = time.perf_counter()
        result["chat"] = compare_on_documents(student, teacher, run_data.eval_chat_docs, pad_id=pad_id,
                                              desc=f"{desc}: held-out chat", progress=cfg.progress)
        log.info("%s: held-out chat in %.1f s", desc, time.perf_counter() - start)
    if run_data.eval_prompts:
        start = time.perf_counter()
        result["generations"] = greedy_generations(
            {"teacher": teacher, "student": student}, tokenizer, run_data.eval_prompts,
            max_new_tokens=cfg.eval_max_new_tokens,
        )
        log.info("%s: %d generations in %.1f s", desc, len(run_data.eval_prompts), time.perf_counter() - start)
    return result


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _loss_curve(run_dir: Path) -> str | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in sorted({r["stage"] for r in records}):
        rs = [r for r in records if r["stage"] == stage]
        tokens = [r["tokens"] for r in rs]
        axes[0].plot(tokens, [r["loss"] for r in rs], label=f"stage {stage}")
        axes[1].plot(tokens, [r["kl"] for r in rs], label=f"stage {stage}")
    axes[0].set(title="training loss", xlabel="tokens", ylabel="loss")
    axes[1].set(title="KL(teacher || student) on training tokens", xlabel="tokens", ylabel="KL (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curve.png", dpi=110)
    plt.close(fig)
    return "loss_curve.png"


def _before_after_plot(run_dir: Path, before: dict, after: dict) -> str | None:
    if "text" not in before or "text" not in after:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = ["teacher", "converted", "distilled"]
    ppl = [before["text"]["teacher_ppl"], before["text"]["student_ppl"], after["text"]["student_ppl"]]
    axes[0].bar(labels, ppl, color=["#555", "#c66", "#6a6"])
    axes[0].set(title="perplexity on held-out text", yscale="log")
    part = "chat" if "chat" in before else "text"
    kl = [before[part]["kl"], after[part]["kl"]]
    axes[1].bar(["converted", "distilled"], kl, color=["#c66", "#6a6"])
    axes[1].set(title=f"KL to teacher on held-out {part}")
    fig.tight_layout()
    fig.savefig(run_dir / "before_after.png", dpi=110)
    plt.close(fig)
    return "before_after.png"


def render_report(metrics: dict, images: list[str]) -> str:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    cfg = metrics.get("config", {})
    lines = [
        "# mambaify distillation report",
        "",
        f"Teacher `{cfg.get('teacher')}`, stage `{cfg.get('stage')}`, schedule `{cfg.get('schedule') or cfg.get('attention')}`, "
        f"device `{metrics.get('device')}` x {metrics.get('processes', 1)}.",
        "",
        "## Before and after",
        "",
        "| data | metric | teacher | converted (before) | distilled (after) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for part in ("text", "chat"):
        if part in before and part in after:
            b, a = before[part], after[part]
            lines.append(f"| {part} | perplexity | {_fmt(b['teacher_ppl'])} | {_fmt(b['student_ppl'])} | {_fmt(a['student_ppl'])} |")
            lines.append(f"| {part} | KL(teacher‖student) | 0 | {_fmt(b['kl'])} | {_fmt(a['kl'])} |")
            lines.append(f"| {part} | top-1 agreement | 1 | {_fmt(b['top1_agreement'])} | {_fmt(a['top1_agreement'])} |")
    lines += ["", "## Stages", "", "| stage | attention layers | wall time (s) |", "| --- | --- | --- |"]
    for s in metrics.get("stages", []):
        lines.append(f"| {s['index']} ({s['label']}) | {s['attn_layers']} | {s['wall_s']:.0f} |")
    for image in images:
        lines += ["", f"![{image}]({image})"]
    gens = after.get("generations") or []
    if gens:
        lines += ["", "## Greedy generations, side by side", ""]
        for g in gens:
            lines += [f"**Prompt:** {g['prompt']}", "", f"- teacher: {g['teacher']!r}", f"- student: {g['student']!r}", ""]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, metrics: dict) -> Path:
    run_dir = Path(run_dir)
    images = [img for img in (_loss_curve(run_dir),
                              _before_after_plot(run_dir, metrics.get("before") or {}, metrics.get("after") or {})) if img]
    path = run_dir / "report.md"
    path.write_text(render_report(metrics, images))
    return path


__all__ = ["evaluate_pair", "render_report", "write_report"]
