"""The ``mambaify`` command line.

    mambaify convert TEACHER OUT --attention 0.5
    mambaify generate MODEL "prompt" --max-new-tokens 64 [--draft DRAFT --k 4|auto]
    mambaify chat MODEL [--draft DRAFT --k 4|auto]

Bad input ends with one line on stderr and exit status 2, never a traceback
(set MAMBAIFY_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import torch

from .distill.flags import add_flags, add_switches, flag_values, shared_flags, switch_values

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad input from the command line."""


def parse_attention(text: str) -> float | list[int]:
    """'0.5' -> a fraction; '1,3,5' (or '[1, 3, 5]') -> explicit layer indices."""
    text = text.strip().strip("[]")
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return float(text)
    except ValueError:
        raise UsageError(
            f"--attention takes a fraction in [0, 1] (e.g. 0.5) or comma-separated layer indices (e.g. 1,3,5), got {text!r}"
        ) from None


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import attention_layers_for, check_init, convert
    from .fileio import atomic_directory, check_output_dir
    from .teachers import load_teacher

    attention = parse_attention(args.attention)
    check_init(args.init)
    check_output_dir(args.out)  # fail before the (slow) teacher load
    teacher, tokenizer = load_teacher(args.teacher, dtype=_DTYPES[args.dtype])
    attention_layers_for(teacher.config.num_hidden_layers, attention)  # validates against the depth
    hybrid = convert(teacher, attention=attention, seed=args.seed, init=args.init)
    with atomic_directory(args.out) as tmp:
        hybrid.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = hybrid.config.num_hidden_layers
    print(
        f"wrote {args.out}: {n - len(hybrid.config.mamba_layers)}/{n} attention layers "
        f"{hybrid.config.attn_layers}, {len(hybrid.config.mamba_layers)} Mamba2 layers"
    )


_DISTILL_FLAGS = {
    # flag: (DistillConfig field, type, help)
    "--teacher": ("teacher", str, "teacher (default smollm2-135m-instruct)"),
    "--attention": ("attention", parse_attention, "attention kept in the first stage: fraction or indices (default 0.5)"),
    "--out": ("out", str, "run directory (default runs/demo)"),
    "--schedule": ("schedule", str, "progressive '0.5,0.25,0.125' or 'stepwise:0.25'"),
    "--stage": ("stage", str, "stage1 (only Mamba layers train) or e2e (everything trains)"),
    "--init": ("init", str, "how converted layers' new Mamba parameters start: linear-attention (default; trains "
                         "faster, see RESULTS.md) or paper"),
    "--data": ("data", str, "builtin, a .jsonl/.txt file, or a Hugging Face dataset name"),
    "--tokens": ("tokens", int, "training tokens per stage"),
    "--time-budget-s": ("time_budget_s", float, "fit each stage's schedule into this many seconds of training "
                                                 "(without --tokens: train for the budget)"),
    "--lr": ("lr", float, "peak learning rate (default by stage)"),
    "--kl-weight": ("kl_weight", float, "weight of KL(teacher||student)"),
    "--ce-weight": ("ce_weight", float, "weight of CE on the target tokens"),
    **shared_flags("teacher"),
}


def cmd_distill(args: argparse.Namespace) -> None:
    from .distill.trainer import DistillConfig, distill

    overrides = flag_values(args, _DISTILL_FLAGS)
    if args.reverse_kl:
        overrides["reverse_kl"] = True
    overrides.update(switch_values(args))
    cfg = DistillConfig.from_flags(args.config, overrides, resume=args.resume)
    metrics = distill(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one summary
        return
    before, after = metrics.get("before", {}), metrics.get("after", {})
    for part in ("text", "chat"):
        if part in before and part in after:
            print(
                f"{part}: perplexity teacher {before[part]['teacher_ppl']:.2f}, converted {before[part]['student_ppl']:.2f}"
                f" -> distilled {after[part]['student_ppl']:.2f}; KL {before[part]['kl']:.4f} -> {after[part]['kl']:.4f}"
            )
    print(f"report: {cfg.out}/report.md, model: {cfg.out}/model")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.harness import parse_tasks
    from .eval.standalone import evaluate_model

    path = evaluate_model(args.model, args.teacher, out=args.out, num_texts=args.num_texts,
                          num_chats=args.num_chats, device=args.device,
                          tasks=parse_tasks(args.tasks) if args.tasks is not None else None,
                          tasks_limit=args.tasks_limit, tasks_fewshot=args.tasks_fewshot,
                          tasks_include=args.tasks_include, tasks_batch_size=args.tasks_batch_size)
    print(f"report: {path}")


def _generation_options(args: argparse.Namespace) -> dict:
    """The engine's generation options from the flags, checked (before the slow model load)."""
    from .generate.sampling import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def _speculative_k(args: argparse.Namespace):
    """--k checked (before the slow model load); None without --draft."""
    from .generate.speculative_engine import parse_k

    k = parse_k(args.k)
    if args.draft_int8 and not args.draft:
        raise ValueError("--draft-int8 quantizes the draft: give one with --draft")
    return k if args.draft else None


def _make_engine(args: argparse.Namespace, model, tokenizer, max_length: int, k):
    """The plain engine, or with --draft the speculative one (the draft loaded like the model)."""
    from .generate.engine import Engine
    from .generate.loading import load_for_generation

    cuda_graph = False if args.eager else "auto"
    if not args.draft:
        return Engine(model, tokenizer, max_batch_size=1, max_length=max_length, use_cuda_graph=cuda_graph,
                      compile=args.compile)
    from .draft import check_draft_compatible
    from .generate.speculative_engine import SpeculativeEngine, saved_draft_vocab

    draft, draft_tokenizer = load_for_generation(args.draft, device=args.device, dtype=args.dtype)
    check_draft_compatible(model, draft, tokenizer, draft_tokenizer)
    if args.draft_int8:
        from .generate.quantize import quantize_int8

        quantize_int8(draft)
    # A draft saved with its token list (distill-draft --draft-vocab) proposes from those tokens only.
    return SpeculativeEngine(model, draft, tokenizer, k=k, max_batch_size=1, max_length=max_length,
                             use_cuda_graph=cuda_graph, compile=args.compile, draft_vocab=saved_draft_vocab(args.draft))


def _speculation_totals():
    """An empty :class:`~mambaify.generate.speculative_engine.SpeculativeStats` to add requests to."""
    from .generate.speculative_engine import SpeculativeStats

    return SpeculativeStats()


def _add_speculation(totals, engine) -> None:
    """Add the last request's speculative statistics (if the engine is speculative) to totals."""
    stats = getattr(engine, "stats", None)
    if stats is not None:
        totals.add(stats)


def _report_speculation(totals) -> None:
    """Mean accepted length and tokens/s on stderr, when there were speculative rounds, and per
    K the share of rounds that accepted 0..K drafts (what a choice of K trades)."""
    if totals.row_rounds:
        print(f"mean accepted length {totals.mean_accepted:.2f} draft tokens per verify "
              f"call, {totals.tokens_per_second:.1f} tokens/s", file=sys.stderr)
        for k, counts in sorted(totals.accepted_counts.items()):
            shares = ", ".join(f"{n}: {c / sum(counts):.0%}" for n, c in enumerate(counts))
            print(f"  K={k}, {sum(counts)} rounds; drafts accepted per round: {shares}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate.loading import load_for_generation

    options = _generation_options(args)
    k = _speculative_k(args)
    model, tokenizer = load_for_generation(args.model, device=args.device, dtype=args.dtype)
    prompt_length = len(tokenizer(args.prompt)["input_ids"])
    engine = _make_engine(args, model, tokenizer, prompt_length + args.max_new_tokens, k)
    if args.stream:
        for piece in engine.stream_text(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(engine.generate_text(args.prompt, **options))
    totals = _speculation_totals()
    _add_speculation(totals, engine)
    _report_speculation(totals)


def cmd_chat(args: argparse.Namespace) -> None:
    from .generate.loading import load_for_generation

    options = _generation_options(args)
    k = _speculative_k(args)
    model, tokenizer = load_for_generation(args.model, device=args.device, dtype=args.dtype)
    if not tokenizer.chat_template:
        raise UsageError(f"{args.model} has no chat template; use `mambaify generate` for plain text")
    context = getattr(model.config, "max_position_embeddings", None) or args.max_length
    engine = _make_engine(args, model, tokenizer, min(args.max_length, context), k)
    totals = _speculation_totals()
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /exit or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":  # "" is end of input
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = []
        for piece in engine.stream_chat(history, **options):
            print(piece, end="", flush=True)
            reply.append(piece)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        _add_speculation(totals, engine)
    _report_speculation(totals)


def cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench import options_from_args, render_from_json, run_bench

    if args.from_json:
        render_from_json(args.from_json, Path(args.out))
        print(f"wrote {args.out}/bench.json, bench.md, decode.png, roofline.png")
        return
    run_bench(options_from_args(args))


def _add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("model", help="a saved model folder (hybrid or any causal LM), .gguf file, hub id or teacher name")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens per reply (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 picks the most likely token (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within probability mass p (1: all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", *sorted(_DTYPES)], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--eager", action="store_true", help="do not capture the decode step in a CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (with --draft: the draft and verify rounds) with torch.compile "
                        "first: on a GPU about 2x faster decoding of a small model, after tens of seconds of "
                        "compiling (BENCHMARKS.md); with --k auto, every K it may pick compiles its own rounds")
    p.add_argument("--draft", help="a draft model of the same tokenizer (folder, .gguf, hub id or teacher name): "
                   "speculative decoding; prints the mean accepted length, its distribution per K and tokens/s to stderr")
    p.add_argument("--k", default="4", help="with --draft: draft tokens per round, or 'auto' to adapt it (default 4)")
    p.add_argument("--draft-int8", action="store_true",
                   help="with --draft: the draft's layers in int8 (one scale per row): half the bytes per draft "
                        "step; output stays exactly the model's, only acceptance may change")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mambaify",
        description="Turn a Llama-family Transformer into an attention/Mamba2 hybrid, distil it, serve it.",
    )
    parser.add_argument("--version", action="version", version=f"mambaify {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a teacher into a hybrid (no training)")
    p.add_argument("teacher", help="local HF folder, hub id, .gguf file, or built-in name (smollm2-135m-instruct)")
    p.add_argument("out", help="new directory for the hybrid and its tokenizer")
    p.add_argument("--attention", default="0.5", help="fraction of layers kept as attention, or indices (default 0.5)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed for the new Mamba parameters")
    p.add_argument("--init", default="paper",
                   help="how the new Mamba parameters start: paper (the paper's draws, default) or linear-attention "
                        "(identity conv, long memory, D = 0, out_proj = 0.1 * W_O; see RESULTS.md)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("distill", help="convert and distil a teacher into a hybrid (the main job)")
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_flags(p, _DISTILL_FLAGS)
    p.add_argument("--reverse-kl", action="store_true", help="use KL(student||teacher)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the options it was started with")
    add_switches(p)
    p.set_defaults(func=cmd_distill)

    from .draft import add_distill_draft_arguments, run_distill_draft

    p = sub.add_parser("distill-draft", help="build a speculative-decoding draft from the target's layers and distil it")
    add_distill_draft_arguments(p)
    p.set_defaults(func=run_distill_draft)

    p = sub.add_parser("eval", help="compare a saved model with its teacher (perplexity, KL, agreement)")
    p.add_argument("model", help="a saved hybrid (or any causal LM folder)")
    p.add_argument("--teacher", required=True, help="the teacher to compare with")
    p.add_argument("--out", help="directory for report.md and metrics.json (default MODEL/eval)")
    p.add_argument("--num-texts", type=int, default=64, help="held-out Wikipedia summaries")
    p.add_argument("--num-chats", type=int, default=16, help="held-out teacher responses")
    p.add_argument("--device", default="auto")
    p.add_argument("--tasks", help="also run these lm-evaluation-harness tasks on model and teacher, e.g. "
                   'hellaswag,arc_easy,piqa (needs pip install "mambaify[eval]"; the datasets come from the hub)')
    p.add_argument("--tasks-limit", type=int, help="documents per task (a quick look; default all)")
    p.add_argument("--tasks-fewshot", type=int, help="examples in each prompt (default: the task's own, mostly 0)")
    p.add_argument("--tasks-include", help="a folder of extra lm-eval task YAML files (e.g. tasks over local data)")
    p.add_argument("--tasks-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with the fast generation engine")
    _add_generation_args(p, max_new_tokens=128)
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--stream", action="store_true", help="print the text as it comes")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model on stdin/stdout (its chat template; /exit ends)")
    _add_generation_args(p, max_new_tokens=512)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-length", type=int, default=4096,
                   help="tokens of history plus reply (default 4096, or the model's context if shorter)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="prefill/decode speed, TTFT, memory and HBM roofline of a teacher and its hybrids")
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, decode.png, roofline.png")
    p.add_argument("--families", default="smollm2,llama8b",
                   help="smollm2 (the default teacher) and/or llama8b (Llama-3-8B shape, random weights)")
    p.add_argument("--attention", default="1,0.5,0.25,0.125,0", help="attention fractions; 1 is the teacher")
    p.add_argument("--batch", default="1,16,64", help="batch sizes")
    p.add_argument("--context", default="1024,8192,32768", help="prompt lengths (random token ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point (medians are reported)")
    p.add_argument("--prefill-tokens", type=int, default=32768,
                   help="prompt tokens per timed prefill pass at most (whole rows); larger batches extrapolate TTFT")
    p.add_argument("--prefill-budget-s", type=float, default=5.0,
                   help="stop repeating a prefill once its timed passes add up to this (at least one pass)")
    p.add_argument("--paths", default="engine,hf",
                   help="engine (teacher and hybrids) and/or hf (transformers' generate)")
    p.add_argument("--hf-batch", default="1,64", help="batch sizes of the transformers reference ('none': skip it)")
    p.add_argument("--hf-context", default="", help="contexts of the transformers reference (default: the smallest)")
    p.add_argument("--hf-prefill-chunk", type=int, default=None,
                   help="run generate()'s prefill in chunks of this many tokens (transformers' prefill_chunk_size; "
                        "0: never). Default: one pass where it fits the memory, else the largest power of two that does")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="skip points estimated to need more (default: the GPU's memory)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="record the points not started within this many seconds as skipped")
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="the smollm2 family's teacher")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    p.add_argument("--dtype", choices=["auto", *sorted(_DTYPES)], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="compile the engine's decode step with torch.compile before capturing it in a CUDA graph "
                        "(default off, comparable to earlier runs); each point records whether it ran compiled")
    p.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"], default="default",
                   help="inductor's mode with --compile: max-autotune-no-cudagraphs times Triton templates against "
                        "cuBLAS for each matmul shape (minutes per model) and keeps the fastest")
    p.add_argument("--linear", choices=["auto", "split-k", "modules"], default="auto",
                   help="the engine's linear layers: split-k through mambaify's split-K Triton GEMV (CUDA, at most "
                        "16 rows; points labelled '... split-K linear'), modules through the modules' own forward "
                        "(cuBLAS), auto as the engine picks by default (split-k on CUDA)")
    p.add_argument("--small-batch-linear", action="store_true", help="the same as --linear split-k")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="measure nothing: merge these bench.json files and write the report into --out")
    p.set_defaults(func=cmd_bench)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    # Errors that mean "bad input" and deserve one clear line rather than a traceback.
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from .eval.harness import HarnessNotInstalled

    return (ValueError, TypeError, OSError, StrictDataclassClassValidationError, HarnessNotInstalled)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("mambaify: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        if os.environ.get("MAMBAIFY_DEBUG"):
            raise
        # transformers wraps config validation errors; the cause holds the useful sentence.
        cause = e.__cause__ if e.__cause__ is not None and "validation error" in str(e) else e
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(f"mambaify {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
