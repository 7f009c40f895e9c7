"""Command-line flags that ``mambaify distill`` and ``mambaify distill-draft`` share: both fill a
:class:`~mambaify.distill.trainer.DistillConfig` (a draft's is a subclass), so the options of the
batches, the built-in data, the evaluation and the machine mean the same in both.

Each flag maps to ``(config field, type, help)``; flags given on the command line override a
``--config`` YAML file (``DistillConfig.from_flags``).
"""

from __future__ import annotations

import argparse
from typing import Any

Flags = dict[str, tuple[str, Any, str]]


def shared_flags(answerer: str) -> Flags:
    """The shared flags; ``answerer`` names the model that answers the built-in prompts
    ("teacher" for a hybrid, "target" for a draft)."""
    return {
        "--seq-len": ("seq_len", int, "packed row length"),
        "--batch-size": ("batch_size", int, "rows per micro-batch and process"),
        "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
        "--temperature": ("temperature", float, "distillation temperature"),
        "--num-prompts": ("num_prompts", int, f"built-in data: prompts answered by the {answerer} (past the ~8,900 "
                          "Wikipedia titles, titles are asked again in other phrasings, up to ~50,000)"),
        "--label-tokens": ("label_tokens", int, "built-in data: longest answer per prompt, in tokens"),
        "--label-batch-size": ("label_batch_size", int, "built-in data: prompts per answering batch"),
        "--text-docs": ("text_docs", int, "built-in data: Wikipedia summaries for plain-text KD (about 9,000 exist)"),
        "--eval-texts": ("eval_texts", int, "held-out texts the evaluation before and after scores"),
        "--eval-chats": ("eval_chats", int, f"held-out prompts the {answerer} answers for the evaluation"),
        "--seed": ("seed", int, "random seed"),
        "--device": ("device", str, "auto (the GPU if there is one), cpu or cuda"),
        "--precision": ("precision", str, "auto, bf16 or fp32"),
        "--save-every": ("save_every", int, "steps between checkpoints"),
    }


def add_flags(parser: argparse.ArgumentParser, flags: Flags) -> None:
    """One option per flag, None when not given (so that the YAML file's value stands)."""
    for flag, (field, kind, help_text) in flags.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)


def flag_values(args: argparse.Namespace, flags: Flags) -> dict[str, Any]:
    """The parsed flags by config field (None where not given)."""
    return {field: getattr(args, field) for field, _, _ in flags.values()}


def add_switches(parser: argparse.ArgumentParser) -> None:
    """The on/off options both commands share; a switch given overrides the YAML file."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the student's and the teacher's forward for the training steps "
                             "(inductor fuses norms, activations and residual adds; fla's scans stay outside); "
                             "the first step pays the compile, within --time-budget-s")


def switch_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the given switches set."""
    values: dict[str, Any] = {}
    if args.no_progress:
        values["progress"] = False
    if args.compile:
        values["compile"] = True
    return values
