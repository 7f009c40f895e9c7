"""Draft models for speculative decoding (PAPER.md section 3; issue 5, item 2).

A draft proposes K tokens that the target verifies in one call, so it must be fast and agree
with the target as often as possible. Three kinds:

* a small Transformer made of the teacher's own layers (by default the first and the last),
  with the teacher's embeddings, final norm and LM head: :func:`build_draft_from_teacher`. It is
  an ordinary model of the teacher's family (a ``LlamaForCausalLM`` with two layers, say), so
  ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` just work. Built from a
  mambaify hybrid, it keeps which picked layers are attention and which are Mamba;
* a pure-Mamba2 draft: the same picked layers, converted to Mamba2 with :func:`mambaify.convert`
  (attention-initialised), ``build_draft_from_teacher(..., attention=0.0)``;
* any causal LM with the target's tokenizer: :func:`check_draft_compatible` says whether one is.

:func:`distill_draft` trains a draft against its target (the teacher or the hybrid) with the
distillation tooling of :mod:`mambaify.distill`: the same data, loop, checkpoints, resume and
time budget, with every draft parameter training on the token-level KL to the target.
``mambaify distill-draft`` is its command line (:func:`add_distill_draft_arguments`,
:func:`run_distill_draft`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedModel

from .convert import convert
from .distill.flags import add_flags, add_switches, flag_values, shared_flags, switch_values
from .distill.trainer import DistillConfig
from .models.configuration import SUPPORTED_BASE_MODEL_TYPES, HybridConfig
from .models.modeling import HybridForCausalLM

log = logging.getLogger(__name__)

# Bookkeeping keys of a config dict that are no architecture field (rebuilt by the new config).
_META_FIELDS = ("model_type", "architectures", "transformers_version", "dtype", "_name_or_path")


# ---------------------------------------------------------------------------------------------
# Building a draft from the teacher's own layers
# ---------------------------------------------------------------------------------------------


def draft_layer_indices(num_layers: int, layers: Sequence[int] | str | None = None) -> list[int]:
    """The source layers a draft is made of, as increasing non-negative indices.

    ``None``: the first and the last layer (the paper's draft). ``"all"``: every layer (to start
    from a whole small model). Otherwise indices into the source's layers, where ``-1`` is the
    last one, as in Python.
    """
    if layers is None:
        return sorted({0, num_layers - 1})
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return list(range(num_layers))
        raise ValueError(f"layers must be indices such as [0, -1] or 'all', got {layers!r}")
    picked = list(layers)
    if not picked:
        raise ValueError("a draft needs at least one layer; pass layer indices such as [0, -1]")
    for i in picked:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer indices must be integers, got {i!r} in {picked}")
    bad = [i for i in picked if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(
            f"draft layer indices {bad} out of range: the source has {num_layers} layers "
            f"(0..{num_layers - 1}, or -{num_layers}..-1 counted from the end)"
        )
    resolved = [i % num_layers for i in picked]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"draft layer indices {picked} name the same layer twice ({resolved})")
    if resolved != sorted(resolved):
        raise ValueError(
            f"draft layer indices {picked} ({resolved}) must be in increasing order: the draft runs "
            f"the layers in the source's order; write them as {sorted(resolved)}"
        )
    return resolved


def _check_source(model: nn.Module) -> bool:
    """True for a mambaify hybrid, False for a supported Transformer; raises for anything else."""
    if isinstance(model, HybridForCausalLM):
        return True
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    inner = getattr(model, "model", None)
    if (model_type not in SUPPORTED_BASE_MODEL_TYPES or not hasattr(inner, "layers")
            or getattr(model, "lm_head", None) is None):
        raise ValueError(
            f"cannot build a draft from a {model_type!r} model ({type(model).__name__}); the source must be a "
            f"causal LM of a supported family ({', '.join(SUPPORTED_BASE_MODEL_TYPES)}) or a mambaify hybrid. "
            "Any causal LM with the target's tokenizer can be a draft as it is: see check_draft_compatible"
        )
    return False


def _draft_config(source: PreTrainedModel, layers: list[int], is_hybrid: bool):
    """The source's config with only ``layers``: per-layer fields are picked, everything else kept."""
    config = source.config
    fields = {k: v for k, v in config.to_dict().items() if k not in _META_FIELDS}
    fields["num_hidden_layers"] = len(layers)
    per_layer = fields.get("layer_types")  # Qwen2: full or sliding-window attention, per layer
    if isinstance(per_layer, list) and len(per_layer) == config.num_hidden_layers:
        fields["layer_types"] = [per_layer[i] for i in layers]
    if is_hybrid:
        kept = set(config.attn_layers)
        fields["attn_layers"] = [j for j, i in enumerate(layers) if i in kept]
        new = HybridConfig(**fields)
    else:
        new = type(config)(**fields)
    new._attn_implementation = config._attn_implementation
    return new


def _source_name(name: str, layers: list[int]) -> str:
    """The source tensor a draft tensor copies: draft layer j is source layer layers[j]."""
    prefix = "model.layers."
    if name.startswith(prefix):
        j, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{layers[int(j)]}.{rest}"
    return name


def build_draft_from_teacher(
    teacher: PreTrainedModel,
    layers: Sequence[int] | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    attention: float | Sequence[int] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A small model made of ``teacher``'s own ``layers``, embeddings, final norm and LM head.

    ``teacher``: a Llama, Qwen2 or Mistral causal LM, or a mambaify hybrid. ``layers``: see
    :func:`draft_layer_indices` (default: the first and the last). The draft is a model of the
    teacher's own family with ``num_hidden_layers = len(layers)`` (a hybrid's draft is a
    ``HybridForCausalLM`` whose picked layers stay attention or Mamba as they were); the LM head
    stays tied to the embeddings if the teacher ties them. Its forward is exactly the teacher's
    embedding -> the picked layers -> final norm -> head.

    ``attention``: ``None`` keeps the layers as they are; otherwise the draft is converted with
    :func:`mambaify.convert` keeping ``attention`` (a fraction, or indices into the draft's own
    layers) as attention, e.g. ``0.0``: a pure-Mamba2 draft whose Mamba layers start as the
    picked attention layers (C <- W_Q, B <- W_K, x <- W_V, out_proj <- W_O); ``seed`` draws the
    new Mamba parameters. ``dtype``: the draft's dtype (default: the teacher's). The draft is on
    the teacher's device, in eval mode; the global random state is left untouched.
    """
    is_hybrid = _check_source(teacher)
    picked = draft_layer_indices(teacher.config.num_hidden_layers, layers)
    config = _draft_config(teacher, picked, is_hybrid)
    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG as it was
        torch.manual_seed(seed)
        if is_hybrid:
            draft = HybridForCausalLM(config)
        else:
            from transformers import AutoModelForCausalLM

            draft = AutoModelForCausalLM.from_config(config)
    draft.to(dtype=param.dtype, device=param.device)

    source_state = teacher.state_dict()
    with torch.no_grad():
        for name, tensor in draft.state_dict().items():
            source_name = _source_name(name, picked)
            if source_name not in source_state:
                raise RuntimeError(f"draft tensor {name} has no source tensor {source_name} in {type(teacher).__name__}")
            tensor.copy_(source_state[source_name])
    draft.generation_config = copy.deepcopy(teacher.generation_config)
    if attention is not None:
        draft = convert(draft, attention=attention, seed=seed)
    if dtype is not None:
        draft.to(dtype=dtype)
    return draft.eval()


# ---------------------------------------------------------------------------------------------
# Any causal LM with the same tokenizer
# ---------------------------------------------------------------------------------------------


def _head_size(model: nn.Module, role: str) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"the {role} ({type(model).__name__}) has no language-model head; speculative decoding "
            "needs a causal LM (e.g. an AutoModelForCausalLM) on both sides"
        )
    return int(head.weight.shape[0])


def _vocab_difference(target_vocab: dict[str, int], draft_vocab: dict[str, int], shown: int = 3) -> str:
    """A few tokens the two vocabularies disagree on, in the target's id order."""
    diffs = []
    for token, i in sorted(target_vocab.items(), key=lambda kv: kv[1]):
        if draft_vocab.get(token) != i:
            diffs.append(f"{token!r}: target id {i}, draft {draft_vocab.get(token, 'missing')}")
    extra = sorted(set(draft_vocab) - set(target_vocab), key=lambda t: draft_vocab[t])
    diffs += [f"{t!r}: only the draft has it (id {draft_vocab[t]})" for t in extra]
    more = f" and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return "; ".join(diffs[:shown]) + more


def check_draft_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ``ValueError`` unless ``draft`` can propose tokens for ``target``.

    Speculative decoding compares the two models token id by token id (and, when sampling, their
    next-token distributions entry by entry), so the LM heads must have the same number of
    outputs and, when the tokenizers are given, they must map the same strings to the same ids.
    Any causal LM that passes may be a draft (issue 5, item 2b).
    """
    v_target, v_draft = _head_size(target, "target"), _head_size(draft, "draft")
    for role, tokenizer, size in (("target", target_tokenizer, v_target), ("draft", draft_tokenizer, v_draft)):
        if tokenizer is not None and len(tokenizer) > size:
            raise ValueError(
                f"the {role}'s tokenizer has {len(tokenizer)} tokens but its LM head only {size} outputs; "
                f"this tokenizer does not belong to this {role} model: load the model's own tokenizer"
            )
    if target_tokenizer is not None and draft_tokenizer is not None:
        t_vocab, d_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if t_vocab != d_vocab:
            raise ValueError(
                f"the draft's tokenizer differs from the target's ({len(d_vocab)} vs {len(t_vocab)} tokens; "
                f"{_vocab_difference(t_vocab, d_vocab)}): draft and target must share one tokenizer; use a "
                "draft of the target's own tokenizer, e.g. one built from the target's layers with "
                "`mambaify distill-draft`"
            )
    if v_target != v_draft:
        same_tokenizer = target_tokenizer is not None and draft_tokenizer is not None
        fix = (f"the tokenizers agree, so resize the draft's head to the target's with "
               f"draft.resize_token_embeddings({v_target})" if same_tokenizer else
               "use a draft with the target's tokenizer and vocabulary, e.g. one built from the target's "
               "layers with `mambaify distill-draft` (pass both tokenizers to compare them)")
        raise ValueError(
            f"vocabulary sizes differ: the target's LM head has {v_target} outputs, the draft's {v_draft}; {fix}"
        )


# ---------------------------------------------------------------------------------------------
# Training a draft against its target
# ---------------------------------------------------------------------------------------------


@dataclass
class DraftConfig(DistillConfig):
    """Options of ``mambaify distill-draft``; a YAML file can hold any subset.

    The fields of :class:`DistillConfig` mean what they mean there, with ``teacher`` naming the
    *target* (a teacher or a saved hybrid). Draft fields: ``layers`` (source layers, default the
    first and the last; ``"all"``; negative indices count from the end), ``attention`` (``None``
    keeps the layers' kinds; ``0.0`` converts them all to Mamba2, ``--mamba``), ``draft_from``
    (where the layers come from; default: the target itself).
    """

    out: str = "runs/draft"
    attention: Any = None
    # Every draft parameter trains (the trainer's "e2e"; stage 1 would train only Mamba layers).
    stage: str = "e2e"
    # A draft of two layers starts far from its target and is small: a larger step than the
    # hybrid's end-to-end 1e-4 (an untuned default; see configs/ and BENCHMARKS.md for measured ones).
    lr: float | None = 3e-4
    layers: Any = None
    draft_from: str | None = None
    # The loss is the token-level forward KL(p_target || q_draft), as in the trainer. Why forward:
    # verification keeps the target's own tokens. Greedy, a draft token survives iff it is the
    # target's argmax; sampling, with probability min(1, p/q), so sum_x min(p(x), q(x)) =
    # 1 - TV(p, q) of the proposals survive. Forward KL is the draft's cross-entropy on the
    # target's whole next-token distribution, weighted by p: the tokens the target is likeliest
    # to emit weigh most, and a draft that gives little mass to a token the target often takes
    # pays log(p/q) without bound. Reverse KL (mode-seeking) lets a small draft drop such tokens
    # cheaply, and each time the target takes one the round ends there. Either KL -> 0 gives
    # TV -> 0 (Pinsker); on a draft too small to get there, forward KL spends its capacity where
    # the target's mass is. reverse_kl: true stays available (YAML) for comparison.
    reverse_kl: bool = False
    # > 0: also save the draft_vocab most frequent tokens of the training data with the model
    # (model/draft_vocab.json); generation then cuts the draft's LM head to them, which pays off
    # where the head is a large part of a draft step (a 128k vocabulary).
    draft_vocab: int = 0

    def validate(self) -> None:
        super().validate()
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: keep the whole head), got {self.draft_vocab}")
        if self.stage != "e2e":
            raise ValueError(
                f"distill-draft trains every draft parameter (stage e2e); stage {self.stage!r} is for hybrids: "
                "remove the stage option"
            )
        if self.schedule:
            raise ValueError("a draft is trained in one stage; remove the schedule option")
        if isinstance(self.layers, str) and self.layers.strip().lower() != "all":
            raise ValueError(f"layers must be a list of indices such as [0, -1] or 'all', got {self.layers!r}")


@dataclass(frozen=True)
class _DraftStage:
    """What :func:`mambaify.distill.trainer.train_stage` reads of a stage."""

    index: int = 0
    label: str = "draft"


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def _describe(draft: PreTrainedModel, picked: list[int], source: str) -> dict:
    config = draft.config
    attn = list(getattr(config, "attn_layers", range(config.num_hidden_layers)))
    return {"source": source, "source_layers": picked, "class": type(draft).__name__,
            "num_layers": config.num_hidden_layers, "attn_layers": attn, "parameters": _count_parameters(draft)}


def _tokens_per_round(agreement: float, k: int) -> float:
    """Expected accepted drafts per greedy round of K if each position agreed independently."""
    return k if agreement >= 1 else agreement * (1 - agreement**k) / (1 - agreement)


def _write_report(run_dir: Path, metrics: dict) -> Path:
    from .eval.report import _loss_curve

    cfg, draft = metrics["config"], metrics["draft"]
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    lines = [
        "# mambaify draft distillation report", "",
        f"Target `{cfg['teacher']}`; draft: layers {draft['source_layers']} of `{draft['source']}` as a "
        f"{draft['class']} ({draft['num_layers']} layers, attention at {draft['attn_layers']}, "
        f"{draft['parameters'] / 1e6:.1f}M parameters); device `{metrics['device']}` x {metrics['processes']}.", "",
        "| data | metric | target | draft (before) | draft (after) |", "| --- | --- | --- | --- | --- |",
    ]
    for part in ("text", "chat"):
        if part in before and part in after:
            b, a = before[part], after[part]
            lines += [f"| {part} | perplexity | {b['teacher_ppl']:.4g} | {b['student_ppl']:.4g} | {a['student_ppl']:.4g} |",
                      f"| {part} | KL(target‖draft) | 0 | {b['kl']:.4g} | {a['kl']:.4g} |",
                      f"| {part} | top-1 agreement | 1 | {b['top1_agreement']:.4g} | {a['top1_agreement']:.4g} |"]
    part = "chat" if "chat" in after else "text"
    if part in after:
        alpha = after[part]["top1_agreement"]
        guesses = ", ".join(f"K={k}: {_tokens_per_round(alpha, k):.2f}" for k in (2, 4, 6))
        lines += ["", f"Greedy acceptance estimate from the {part} top-1 agreement {alpha:.3f}, if positions "
                  f"agreed independently: drafts accepted per round {guesses} (measure with `mambaify generate --draft`)."]
    image = _loss_curve(run_dir)
    if image:
        lines += ["", f"![{image}]({image})"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def distill_draft(cfg: DraftConfig, resume: bool = False, stop_after_steps: int | None = None) -> dict:
    """Build a draft (or take it from the checkpoint) and train it against ``cfg.teacher``.

    The run directory ``cfg.out`` ends up holding ``model/`` (the draft and the target's
    tokenizer, loadable with ``AutoModelForCausalLM``), ``metrics.json`` (KL, top-1 agreement
    and perplexity on held-out data before and after), ``metrics.jsonl`` (per step),
    ``report.md`` and ``checkpoint/`` (for ``resume``). Everything is written atomically.
    ``stop_after_steps`` aborts as a kill would (tests use it to check ``resume``).
    Returns the metrics.
    """
    from .distill.trainer import (_check_run_dir, check_memory, make_accelerator, prepare_data, student_shards,
                                  train_stage)
    from .eval.report import evaluate_pair
    from .fileio import replace_directory, write_json_atomic
    from .generate.loading import load_for_generation

    cfg.validate()
    run_dir = Path(cfg.out)
    state = _check_run_dir(run_dir, cfg, resume)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    target_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                    "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.teacher_dtype]
    target, tokenizer = load_for_generation(cfg.teacher, dtype=target_dtype, device=device)
    for p in target.parameters():
        p.requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    check_memory(cfg, target.config, device, bf16=accelerator.mixed_precision == "bf16",
                 shards=student_shards(accelerator))

    source_name = cfg.draft_from or cfg.teacher
    if state is None:  # build the draft before claiming the run directory: bad layers fail here
        if cfg.draft_from:
            source, source_tokenizer = load_for_generation(cfg.draft_from, dtype=torch.float32, device=device)
        else:
            source, source_tokenizer = target, tokenizer
        picked = draft_layer_indices(source.config.num_hidden_layers, cfg.layers)
        draft = build_draft_from_teacher(source, picked, dtype=torch.float32, attention=cfg.attention, seed=cfg.seed)
        check_draft_compatible(target, draft, tokenizer, source_tokenizer)
        del source
    else:
        from transformers import AutoModelForCausalLM

        picked = None
        draft = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint" / "student", dtype=torch.float32)
    draft = draft.to(device)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    run_data = prepare_data(cfg, target, tokenizer, run_dir, accelerator)

    metrics_json = run_dir / "metrics.json"
    if state is not None and metrics_json.is_file():
        metrics = json.loads(metrics_json.read_text())
    else:
        metrics = {"config": cfg.to_dict(), "device": str(device), "processes": accelerator.num_processes,
                   "draft": _describe(draft, picked or cfg.layers, source_name)}
        # A resumed run no longer has the untrained draft: its "before" comes from metrics.json.
        metrics["before"] = evaluate_pair(draft, target, tokenizer, run_data, cfg, desc="draft before") \
            if state is None else None
        log.info("draft %s", metrics["draft"])
        if accelerator.is_main_process:
            write_json_atomic(metrics_json, metrics)

    t_start = time.perf_counter()
    if state is not None and state.get("stage_done"):
        draft.eval().requires_grad_(False)
    else:
        with open(run_dir / "metrics.jsonl", "a") as metrics_file:
            draft = train_stage(cfg, _DraftStage(), draft, target, run_data.train_docs, run_dir, accelerator,
                                state, metrics_file, pad_id, stop_after_steps)
    metrics["train_wall_s"] = time.perf_counter() - t_start  # of this process (a resumed run: since the resume)
    metrics["after"] = evaluate_pair(draft, target, tokenizer, run_data, cfg, desc="draft after")

    if accelerator.is_main_process:
        tmp = run_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cfg.draft_vocab:
            from .distill.data import _stop_ids
            from .generate.speculative_engine import DRAFT_VOCAB_FILE, frequent_tokens

            ids = frequent_tokens((doc["input_ids"] for doc in run_data.train_docs), cfg.draft_vocab,
                                  always=_stop_ids(tokenizer, target))
            write_json_atomic(tmp / DRAFT_VOCAB_FILE, {
                "token_ids": ids, "source": f"the {cfg.draft_vocab} tokens most frequent in the draft's training data, "
                                            "and the stop tokens"})
        replace_directory(tmp, run_dir / "model")
        write_json_atomic(metrics_json, metrics)
        _write_report(run_dir, metrics)
    accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line: mambaify distill-draft
# ---------------------------------------------------------------------------------------------


def parse_layers(text: str) -> list[int] | str:
    """'0,-1' -> [0, -1]; 'all' -> 'all' (for argparse: errors are ArgumentTypeError)."""
    text = text.strip().strip("[]")
    if text.lower() == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated layer indices such as 0,-1 (negative counts from the end) "
            f"or 'all', got {text!r}"
        ) from None


_DRAFT_FLAGS = {
    # flag: (DraftConfig field, type, help)
    "--target": ("teacher", str, "the model the draft serves: a built-in teacher name, a teacher folder, hub id "
                 "or .gguf, or a saved hybrid folder (default smollm2-135m-instruct)"),
    "--out": ("out", str, "run directory; the draft lands in OUT/model (default runs/draft)"),
    "--layers": ("layers", parse_layers, "source layers of the draft, e.g. 0,-1 (the default: first and last) "
                 "or 'all'; write --layers=-2,-1 when the list starts with a minus"),
    "--draft-from": ("draft_from", str, "take the layers from this model instead of the target (same tokenizer), "
                     "e.g. the teacher of a hybrid target"),
    "--data": ("data", str, "builtin (the target's answers and Wikipedia text), a .jsonl/.txt file, or a "
               "Hugging Face dataset name"),
    "--eval-data": ("eval_data", str, "held-out text for KL and perplexity (default: built-in Wikipedia)"),
    "--tokens": ("tokens", int, "training tokens"),
    "--time-budget-s": ("time_budget_s", float, "cap on the training time, in seconds (shortens the schedule; "
                                                 "without --tokens: train for the budget)"),
    "--lr": ("lr", float, "peak learning rate (default 3e-4)"),
    "--kl-weight": ("kl_weight", float, "weight of KL(target||draft) (default 1)"),
    "--ce-weight": ("ce_weight", float, "weight of CE on the data's tokens (default 0)"),
    "--draft-vocab": ("draft_vocab", int, "also save the N tokens most frequent in the training data with the "
                      "draft (model/draft_vocab.json): generation then cuts the draft's LM head to them "
                      "(worth it for large vocabularies); 0: the whole head (default)"),
    **shared_flags("target"),
}


def add_distill_draft_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mambaify distill-draft`` (flags override a --config YAML file)."""
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_flags(parser, _DRAFT_FLAGS)
    parser.add_argument("--mamba", action="store_true",
                        help="convert the draft's layers to Mamba2 (attention-initialised): a pure-Mamba2 draft")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with the options it was started with")
    add_switches(parser)


def run_distill_draft(args: argparse.Namespace) -> int:
    """``mambaify distill-draft``: returns 0. Bad input raises ValueError / OSError with one clear
    line, which ``mambaify``'s main prints as ``error: ...`` with exit status 2."""
    overrides = flag_values(args, _DRAFT_FLAGS)
    if args.mamba:
        overrides["attention"] = 0.0
    overrides.update(switch_values(args))
    cfg = DraftConfig.from_flags(args.config, overrides, resume=args.resume)
    metrics = distill_draft(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one summary
        return 0
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for part in ("text", "chat"):
        if part in before and part in after:
            print(f"{part}: KL(target||draft) {before[part]['kl']:.4f} -> {after[part]['kl']:.4f}; top-1 agreement "
                  f"{before[part]['top1_agreement']:.3f} -> {after[part]['top1_agreement']:.3f}")
    d = metrics["draft"]
    print(f"draft: {cfg.out}/model ({d['num_layers']} layers of {d['source']}, attention at {d['attn_layers']}, "
          f"{d['parameters'] / 1e6:.1f}M parameters); report: {cfg.out}/report.md")
    return 0


__all__ = [
    "DraftConfig",
    "add_distill_draft_arguments",
    "build_draft_from_teacher",
    "check_draft_compatible",
    "distill_draft",
    "draft_layer_indices",
    "parse_layers",
    "run_distill_draft",
]
