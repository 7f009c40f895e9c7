"""Standard benchmarks through EleutherAI's lm-evaluation-harness (``pip install "mambaify[eval]"``).

The paper scores its hybrids on lm-eval's zero-shot tasks (PAPER.md section 4). ``mambaify eval
MODEL --teacher T --tasks hellaswag,arc_easy`` runs the same tasks on the model and on its
teacher, in this process, so the table in its report compares like with like. lm-eval's own
command line works on a saved hybrid too, through the ``trust_remote_code`` modules every hybrid
folder carries (:mod:`mambaify.models.remote_code`)::

    lm_eval --model hf --model_args pretrained=runs/demo/model,trust_remote_code=True --tasks hellaswag

Tasks come from lm-eval's registry (their datasets from the Hugging Face hub, so they need
network or a filled datasets cache) or from YAML files in ``include_path`` (a task over a local
JSON file needs neither).
"""

from __future__ import annotations

import math
from pathlib import Path

INSTALL_HINT = 'pip install "mambaify[eval]" (or pip install lm-eval)'


def parse_tasks(text: str) -> list[str]:
    """'hellaswag, arc_easy' -> ['hellaswag', 'arc_easy'] (order kept, repeats dropped)."""
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise ValueError(f"--tasks takes comma-separated lm-eval task names such as hellaswag,arc_easy; got {text!r}")
    return tasks


class HarnessNotInstalled(ImportError):
    """lm-eval is missing; the command line prints this as its one-line error."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HarnessNotInstalled(f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed "
                                  f"({err}): {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def check_tasks(tasks: list[str], include_path: str | None = None):
    """The task manager, once every name in ``tasks`` is known to it; raises ValueError otherwise.

    Called before any model loads, so that a misspelt task fails in a second.
    """
    _, _, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--tasks-include {include_path}: no such folder (it should hold lm-eval task YAML files)")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's registry{where}; `lm_eval ls tasks` "
            "lists the registry, and --tasks-include FOLDER adds task YAML files of your own"
        )
    return manager


def harness_scores(model, tokenizer, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, include_path: str | None = None, task_manager=None) -> dict[str, dict]:
    """Run ``tasks`` on ``model`` (a loaded causal LM); returns ``{task: {metric: {"value", "stderr"}}}``.

    ``limit`` caps the documents per task (a quick look; lm-eval warns that such scores are not
    comparable to published ones). Scores of groups (e.g. ``mmlu``) are listed beside their tasks.
    """
    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager or check_tasks(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, metrics in out["results"].items():
        row: dict[str, dict[str, float | None]] = {}
        for key, value in metrics.items():
            # lm-eval's keys are "metric,filter" and "metric_stderr,filter"; "alias" and the like are labels.
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            label = name if filt == "none" else f"{name} ({filt})"
            stderr = metrics.get(f"{name}_stderr,{filt}")
            row[label] = {"value": float(value),
                          "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None}
        if row:
            scores[task] = row
    return scores


def scores_table(teacher: dict[str, dict], model: dict[str, dict]) -> list[str]:
    """Markdown rows: task, metric, teacher, model, and the model's score over the teacher's."""
    lines = ["| task | metric | teacher | model | model / teacher |", "| --- | --- | ---: | ---: | ---: |"]

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "-"
        err = entry.get("stderr")
        return f"{entry['value']:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    for task in model:
        for metric, entry in model[task].items():
            ref = teacher.get(task, {}).get(metric)
            ratio = f"{entry['value'] / ref['value']:.3f}" if ref and ref["value"] else "-"
            lines.append(f"| {task} | {metric} | {cell(ref)} | {cell(entry)} | {ratio} |")
    return lines


def scores_plot(out_dir: Path, teacher: dict[str, dict], model: dict[str, dict]) -> str | None:
    """A bar chart of each task's first metric, teacher beside model; returns the file name."""
    pairs = []
    for task, metrics in model.items():
        metric = next(iter(metrics))
        ref = teacher.get(task, {}).get(metric)
        if ref is not None:
            pairs.append((f"{task}\n{metric}", ref["value"], metrics[metric]["value"]))
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(pairs) + 1.5), 3.4))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [p[1] for p in pairs], width=0.4, label="teacher")
    ax.bar([x + 0.2 for x in xs], [p[2] for p in pairs], width=0.4, label="model")
    ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=8)
    ax.set_xlim(-0.8, len(pairs) - 0.2)
    ax.set_ylim(0, 1.3 * max(max(p[1], p[2]) for p in pairs) or 1.0)  # room for the legend
    ax.set_ylabel("score")
    ax.set_title("lm-evaluation-harness")
    ax.legend(ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(out_dir / "tasks.png", dpi=110)
    plt.close(fig)
    return "tasks.png"


__all__ = ["HarnessNotInstalled", "check_tasks", "harness_scores", "parse_tasks", "scores_plot", "scores_table"]
