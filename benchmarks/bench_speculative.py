"""Speculative decoding speed: end to end on real models, and the verify call on an 8B-shaped hybrid.

Usage (on the H200, after ``source benchmarks/h200/env.sh``):

    # (a) a hybrid with its draft: plain engine vs speculative, batch 1 and 8, bf16
    python3 benchmarks/bench_speculative.py --out DIR --target HYBRID_DIR --draft DRAFT_DIR \
        [--k 2,3,4,6,auto] [--batch 1,8] [--new-tokens 128] [--prompts 16] [--compile]
    # (b) an 8B-shaped random-weight hybrid: one verify call vs K+1 decode steps, fused vs naive
    python3 benchmarks/bench_speculative.py --out DIR --shape llama8b [--attention 0.25,0.5] \
        [--verify-k 2,3,4,5,6,7,8] [--verify-batch 1] [--context 512] [--accepted 2.1,3.0]
    # both at once, or on the CPU with tiny random models (what the tests run):
    python3 benchmarks/bench_speculative.py --out DIR --tiny

(a) End to end. Prompts are chat prompts about the held-out titles of the repository's offline
Wikipedia data (no distillation run trains on them), rendered with the target tokenizer's chat template (``--prompts-file``
gives others: one prompt per line); with ``--tiny``, random token ids. Each batch of prompts is
generated greedily for ``--new-tokens`` tokens per row (stop tokens off, so both paths produce
the same number of tokens) by the plain :class:`Engine` (CUDA-graph decode) and by the
:class:`SpeculativeEngine` at each K (and adaptive K). Reported: tokens/s (wall clock of whole
requests, prefill included, after a warm-up request that captures the graphs and one token of
every request, which captures each prompt width's prefill graph), the ratio to
plain decoding, where a request's time goes (its first token, timed apart with one new token,
and the tokens/s of the rest: ``decode tokens/s`` and ``decode ratio``), the mean accepted length (draft tokens accepted per row and verify call), and
``match``, the fraction of tokens equal to the plain engine's (1.0 up to bf16 near-ties), and
``round ms``: a round's wall time (the requests' time after their first token over their rounds)
beside the device's share at a fixed K (draft + verify graphs, CUDA events; the engine's
``round_times``), which tells a host-bound round from a device-bound one.
``--compile`` builds both engines with ``compile=True`` (torch.compile'd decode step and rounds,
each compiled before its CUDA-graph capture, in the warm-up request), so that the comparison
stays like for like; each point records ``compiled`` and the seconds its warm-up spent compiling.

(b) The verify call. A Llama-3-8B-shaped model with random weights (``mambaify bench``'s
llama8b), converted to hybrids at ``--attention``, a prompt of ``--context`` random tokens, and a
2-layer draft built from the teacher's first and last layers. Timed with CUDA events over CUDA
graph replays, medians of ``--repeats``: one verify call over K + 1 tokens (the target's forward,
the Mamba layers' fused checkpoint + replay kernel, or the naive kernel storing every per-token
state, and the greedy acceptance's argmax), K + 1 plain decode steps of the Engine, and a draft
round (K draft calls, the first over two tokens, as the engine runs them). The speed-up that
follows at K for a mean accepted length a(K): speed-up(K) = (a(K) + 1) tokens per round x decode
step / (verify(K) + draft round(K)). a(K) comes from (a) (``--accepted-from``, one per batch size):
measured at K where (a) ran K; else read off (a)'s rounds at the next larger K it ran (each
(a) point records how many rounds accepted 0..K drafts; a round that accepted n of K' would have
accepted min(n, K) of K); else fitted: the per-token rate alpha solving
(1 - alpha^(K0+1)) / (1 - alpha) = a(K0) + 1 at a measured K0 gives (1 - alpha^(K+1)) / (1 - alpha)
tokens per round at K. ``--accepted a --accepted-k K0`` gives a(K0) by hand, fitted to every other K.
``--draft-step-ms`` replaces the measured draft cost. With ``--compile``, (b) times the engines
themselves as generate() runs them, compiled: the plain Engine's decode step and the
SpeculativeEngine's draft and verify rounds (``measure_rounds``, after a request from the
context-token prompt), fused kernel only (each K and draft head compiles its own rounds: keep
to few of them, e.g. ``--verify-k 2,3,4 --draft-vocab 32768``).

Writes OUT/bench_speculative.json (rewritten after every point), bench_speculative.md and
bench_speculative.png. Points past ``--time-budget-s`` are skipped (recorded as such).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mambaify.generate.clock import Clock  # noqa: E402
from mambaify.generate.engine import fold_norms_default, fused_conv_step_default  # noqa: E402
from mambaify.generate.quantize import quantize_int8  # noqa: E402

DEFAULT_BUILTIN_PROMPTS = [
    # Used only when the offline Wikipedia data cannot be loaded (no network, no cache).
    "Explain how photosynthesis works.",
    "Write a short paragraph about the history of the printing press.",
    "What is the difference between weather and climate?",
    "Give me a brief overview of the French Revolution.",
    "Why is the ocean salty?",
    "Tell me about the planet Jupiter.",
    "Explain what a black hole is in simple terms.",
    "Describe how vaccines train the immune system.",
]


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def k_list(text: str) -> list:
    from mambaify.generate.speculative_engine import parse_k

    try:
        return [parse_k(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench_speculative.{json,md,png}")
    p.add_argument("--tiny", action="store_true", help="tiny random models on any device, for tests (both parts)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--time-budget-s", type=float, default=450.0, help="skip points after this many seconds")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per point (medians reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-int8", action="store_true",
                   help="the draft's layers in int8 with a scale per row (mambaify.generate.quantize), in (a) and (b)")
    p.add_argument("--from-json", type=Path,
                   help="measure nothing: re-render this bench_speculative.json into --out, with (b)'s speed-ups "
                        "recomputed at --accepted / --accepted-from (the verify timings do not depend on them)")
    a = p.add_argument_group("(a) end to end")
    a.add_argument("--target", help="the target model (a saved hybrid folder, or anything mambaify generate loads)")
    a.add_argument("--draft", help="its draft (same tokenizer)")
    a.add_argument("--k", type=k_list, default=k_list("2,3,4,6,auto"), help="K values, 'auto' too (default 2,3,4,6,auto)")
    a.add_argument("--batch", type=int_list, default=[1, 8], help="batch sizes (default 1,8)")
    a.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    a.add_argument("--prompts", type=int, default=16, help="prompts per batch size (default 16)")
    a.add_argument("--prompts-file", type=Path, help="prompts, one per line (default: offline Wikipedia chat prompts)")
    a.add_argument("--e2e-draft-vocab", type=int_list, default=[0],
                   help="(a): cut the draft's LM head to the N tokens most frequent in the offline training "
                        "corpus (train-split Wikipedia summaries; the first N ids with --tiny); 0: the whole "
                        "head; several (e.g. 0,8192): each against the same plain engine (default 0)")
    a.add_argument("--compile", action="store_true",
                   help="torch.compile the plain engine's decode step and the speculative rounds (both engines; "
                        "(b) then times the engines' own compiled step and rounds)")
    a.add_argument("--small-batch-linear", action="store_true",
                   help="both engines' linear layers through mambaify's split-K GEMV (small_batch_linear=True); "
                        "(a), and (b) with --compile")
    a.add_argument("--e2e-linear", type=lambda text: choice_list(text, LINEAR_KINDS, "linear layers"), default=None,
                   help="(a): the linear layers of both engines, several side by side: 'modules' (the modules' "
                        "own, cuBLAS) and/or 'split-k' (mambaify's split-K GEMV); each speculative point is "
                        "against the plain engine of its own kind (default: split-k with --small-batch-linear, "
                        "else modules)")
    a.add_argument("--e2e-draft-weights", type=lambda text: choice_list(text, DRAFT_WEIGHTS, "draft weights"), default=None,
                   help="(a): the draft's weights, several side by side against the same plain engine: "
                        "'float' (as loaded) and/or 'int8' (its layers in int8, a scale per row) "
                        "(default: int8 with --draft-int8, else float)")
    b = p.add_argument_group("(b) the verify call on an 8B-shaped hybrid")
    b.add_argument("--shape", choices=["llama8b"], help="run (b) with this model shape")
    b.add_argument("--attention", type=float_list, default=[0.25, 0.5], help="attention fractions (default 0.25,0.5)")
    b.add_argument("--verify-k", type=int_list, default=list(range(2, 9)), help="K values (default 2..8)")
    b.add_argument("--verify-batch", type=int_list, default=[1], help="batch sizes (default 1)")
    b.add_argument("--context", type=int, help="prompt tokens before the timed calls (default 512; 32 with --tiny)")
    b.add_argument("--accepted", type=float_list, default=[2.1, 3.0],
                   help="mean accepted lengths from (a) for the speed-up table (default 2.1,3.0)")
    b.add_argument("--accepted-k", type=int, default=4, help="the K the --accepted lengths were measured at")
    b.add_argument("--accepted-from", type=Path,
                   help="an (a) run's bench_speculative.json, in place of --accepted: per batch size with a point "
                        "at --accepted-k, the acceptance at each K measured there, else read off its rounds at a "
                        "larger K, else fitted; if the file is missing, --accepted stays")
    b.add_argument("--draft-step-ms", type=float, help="a draft step's cost, instead of measuring one")
    b.add_argument("--draft-vocab", type=int_list, default=[0],
                   help="(b): also time draft rounds with the draft's LM head cut to this many rows "
                        "(SpeculativeEngine(draft_vocab=...)); 0 is the whole head (default 0)")
    return p


LINEAR_KINDS = ("modules", "split-k")


DRAFT_WEIGHTS = ("float", "int8")


def draft_weights_of(point: dict, meta: dict) -> str:
    """A speculative point's draft weights; runs before --e2e-draft-weights had one kind, --draft-int8's."""
    return point.get("draft_weights") or ("int8" if meta.get("draft_int8") else "float")


def choice_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of ``choices`` (each once, in the order given)."""
    kinds = [t.strip() for t in text.split(",") if t.strip()]
    if not kinds or any(k not in choices for k in kinds):
        raise argparse.ArgumentTypeError(f"{what} are {' or '.join(choices)}, got {text!r}")
    return list(dict.fromkeys(kinds))


# ---------------------------------------------------------------------------------------------
# Timing and results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Results:
    """The run's points, written out after each one."""

    def __init__(self, out: Path, meta: dict, budget_s: float):
        self.out, self.meta = out, meta
        self.data = {"meta": meta, "end_to_end": [], "verify_cost": [], "speedup": [], "skipped": []}
        self.deadline = time.perf_counter() + budget_s
        out.mkdir(parents=True, exist_ok=True)

    def out_of_time(self, what: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        self.data["skipped"].append({"point": what, "reason": "time budget"})
        print(f"skipped (time budget): {what}", flush=True)
        return True

    def add(self, part: str, point: dict) -> None:
        self.data[part].append(point)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()}
        print(f"[{part}] {json.dumps(shown)}", flush=True)
        self.save()

    def save(self) -> None:
        path = self.out / "bench_speculative.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.data, indent=1))
        path.with_suffix(".tmp").replace(path)


# ---------------------------------------------------------------------------------------------
# (a) End to end


def load_prompts(args, tokenizer, count: int, vocab_size: int) -> list[list[int]]:
    """Token ids of ``count`` prompts: chat-rendered text prompts, or random ids with --tiny."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(args.seed)
        return [torch.randint(3, vocab_size, (int(n),), generator=g).tolist()
                for n in torch.randint(4, 24, (count,), generator=g)]
    if args.prompts_file:
        texts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    else:
        from mambaify.distill import data as D

        cached = (D.data_cache_dir() / f"wiki-offline-{D.WIKI_VERSION}-en.jsonl").exists()
        if not cached and not os.environ.get("MAMBAIFY_WIKI_ARCHIVE") and os.environ.get("HF_HUB_OFFLINE"):
            # An offline machine (benchmarks/h200/env.sh) without the data: pip would only time out.
            print("warning: no cached offline Wikipedia data on this offline machine; using built-in prompts",
                  flush=True)
            texts = DEFAULT_BUILTIN_PROMPTS
        else:
            try:
                # Held-out titles: the target and the draft were distilled on train-split prompts,
                # and acceptance measured on those would flatter the draft.
                texts = D.wiki_prompts(count, seed=args.seed + 777, split="heldout")
            except (D.DataError, OSError) as err:
                print(f"warning: offline Wikipedia prompts unavailable ({str(err)[:160]}); using built-in prompts",
                      flush=True)
                texts = DEFAULT_BUILTIN_PROMPTS
    return render_prompts(tokenizer, [texts[i % len(texts)] for i in range(count)])


def render_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as a user turn of the tokenizer's chat template (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True) for t in texts]
        return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    return [tokenizer(t)["input_ids"] for t in texts]


def corpus_draft_vocab(args, tokenizer, n: int, always: Sequence[int]) -> list[int]:
    """The ``n`` tokens most frequent in the train split of the offline Wikipedia data (what the
    drafts were distilled on; never the measured prompts or outputs), plus ``always``."""
    from mambaify.distill import data as D
    from mambaify.generate.speculative_engine import frequent_tokens

    if tokenizer is None:  # --tiny: random models, random prompts
        return list(range(n))
    train, _ = D.wiki_split()
    return frequent_tokens((tokenizer(r["summary"])["input_ids"] for r in train), n, always)


def tiny_pair(device: torch.device, dtype: torch.dtype):
    """A tiny 50% hybrid and a 2-layer draft built from its teacher's first and last layers."""
    import mambaify
    from mambaify.bench import build_teacher
    from mambaify.draft import build_draft_from_teacher

    teacher = build_teacher("tiny", device, dtype)
    draft = build_draft_from_teacher(teacher).eval()
    return mambaify.convert(teacher, attention=0.5).eval(), draft


def warm_prefills(engine, batches: list[list[list[int]]], **options) -> None:
    """One token for every request before any is timed: each prompt width's prefill graph is
    captured here (on a GPU, one per padded width, on its first use), not inside the first timed
    repeat, where a median of two repeats would average it in."""
    for batch in batches:
        engine.generate(batch, max_new_tokens=1, stop_token_ids=[], **options)


def timed_generate(engine, batches: list[list[list[int]]], device: torch.device, **options) -> tuple[float, list, list]:
    """Seconds to generate every batch (one request each), the tokens, and each request's
    SpeculativeStats (None for the plain engine)."""
    sync(device)
    start = time.perf_counter()
    outputs, stats = [], []
    for batch in batches:
        outputs.append(engine.generate(batch, **options))
        stats.append(getattr(engine, "stats", None))
    sync(device)
    return time.perf_counter() - start, outputs, stats


def eager_prefills(engine, counted: dict, label: str) -> int:
    """The timed requests' prefills that did not replay a graph (since ``counted``), with a
    warning where the engine graphs its prefills: the first token is timed apart from a graphed
    prefill (split_first_token), so an eager one inside the timed requests would be charged to
    decoding (session 8's end-to-end rounds: ~45 ms per request, 0.9 ms per round)."""
    eager = engine.prefill_counts["eager"] - counted["eager"]
    if eager and engine.prefill_widths is not None:
        print(f"warning: {label}: {eager} timed prefills ran eagerly (the prompt's graphed width did not fit "
              f"the engine); their time counts as decoding", flush=True)
    return eager


def split_first_token(engine, batches, device, repeats: int, seconds: float, tokens: int, **options) -> dict:
    """The requests' time to their first token (prefill and its sample; for the speculative
    engine the draft's prefill too), timed apart with ``max_new_tokens=1``, and the tokens/s of
    what follows it: where the time of a request goes, and the decode-only ratio."""
    options = dict(options, max_new_tokens=1)
    first = statistics.median(timed_generate(engine, batches, device, **options)[0] for _ in range(repeats))
    rows = sum(len(batch) for batch in batches)
    return dict(first_token_ms=1000 * first / len(batches),
                decode_tokens_per_s=(tokens - rows) / max(seconds - first, 1e-9))


def acceptance_over(stats: list) -> dict:
    """Acceptance statistics over several requests, with how many (row, round) pairs accepted
    0..K drafts at each K (``accepted_counts``; (b) reads the acceptance at smaller K off them)."""
    from mambaify.generate.speculative_engine import SpeculativeStats

    total = SpeculativeStats()
    for s in stats:
        total.add(s)
    return dict(mean_accepted=total.mean_accepted, tokens_per_round=total.tokens_per_round, rounds=total.rounds,
                k_used=total.k_used, accepted_counts=total.accepted_counts)


def run_end_to_end(args, results: Results, device: torch.device, dtype: torch.dtype) -> None:
    from mambaify.generate.engine import Engine
    from mambaify.generate.loading import load_for_generation

    if args.tiny:
        (target, draft), tokenizer = tiny_pair(device, dtype), None
    else:
        target, tokenizer = load_for_generation(args.target, device=str(device), dtype=str(dtype).split(".")[-1])
        draft, _ = load_for_generation(args.draft, device=str(device), dtype=str(dtype).split(".")[-1])
    weights = args.e2e_draft_weights or ["int8" if args.draft_int8 else "float"]
    drafts = {}
    for kind in weights:  # an int8 copy beside the float draft where both are asked for
        drafts[kind] = draft if kind == "float" or "float" not in weights else copy.deepcopy(draft)
        if kind == "int8":
            quantize_int8(drafts[kind])
    prompts = load_prompts(args, tokenizer, max(args.prompts, max(args.batch)), target.config.vocab_size)
    new = args.new_tokens
    length = max(len(p) for p in prompts) + new
    fixed = [k for k in args.k if k != "auto"]
    options = dict(max_new_tokens=new, stop_token_ids=[])
    cut_heads: dict[int, list[int]] = {}  # rows -> the draft's kept token ids, computed once
    linears = args.e2e_linear or ["split-k" if args.small_batch_linear else "modules"]
    for batch, linear in ((b, kind) for b in args.batch for kind in linears):
        batches = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
        label = f"batch {batch}" + (f", {linear} linear layers" if len(linears) > 1 else "")
        if results.out_of_time(f"(a) {label}"):
            continue
        plain = Engine(target, tokenizer, max_batch_size=batch, max_length=length, compile=args.compile,
                       small_batch_linear=linear == "split-k")
        plain.generate(batches[0], max_new_tokens=4, stop_token_ids=[])  # compile and capture the decode step
        warm_prefills(plain, batches)
        times, reference = [], None
        counted = dict(plain.prefill_counts)
        for _ in range(args.repeats):
            seconds, reference, _ = timed_generate(plain, batches, device, **options)
            times.append(seconds)
        plain_eager = eager_prefills(plain, counted, f"plain, {label}")
        tokens = sum(o.numel() for o in reference)
        plain_tps = tokens / statistics.median(times)
        plain_split = split_first_token(plain, batches, device, args.repeats, statistics.median(times), tokens,
                                        **options)
        results.add("end_to_end", dict(path="plain", batch=batch, k=None, prompts=len(batches) * batch,
                                       tokens=tokens, seconds=statistics.median(times), tokens_per_s=plain_tps,
                                       ratio=1.0, **plain_split, decode_ratio=1.0, eager_prefills=plain_eager,
                                       compiled=plain.is_compiled(batch), compile_s=plain.compile_seconds,
                                       linear=linear))
        for rows in args.e2e_draft_vocab:
            if rows and rows not in cut_heads:
                cut_heads[rows] = corpus_draft_vocab(args, tokenizer, rows, plain.stop_token_ids)
        del plain
        for rows, kind in ((r, w) for w in weights for r in args.e2e_draft_vocab):
            head = (f", draft head {rows} rows" if rows else "") + (f", {kind} draft" if len(weights) > 1 else "")
            if results.out_of_time(f"(a) {label}{head}"):
                continue
            speculative_points(args, results, target, drafts[kind], tokenizer, batches, batch, length, fixed,
                               cut_heads.get(rows), rows, reference, plain_tps, plain_split, device, options,
                               linear, label, draft_weights=kind, name_weights=len(weights) > 1)


def speculative_points(args, results: Results, target, draft, tokenizer, batches, batch: int, length: int,
                       fixed: list[int], draft_vocab: list[int] | None, rows: int, reference, plain_tps: float,
                       plain_split: dict, device: torch.device, options: dict, linear: str = "modules",
                       label: str | None = None, draft_weights: str = "float", name_weights: bool = False) -> None:
    """(a)'s speculative points of one batch size, draft head (``rows``, 0 the whole head), kind
    of linear layers and draft weights ('float' or 'int8', as ``draft`` holds them): one
    SpeculativeEngine, every K of ``args.k``, against the figures of the plain engine with the
    same linear layers."""
    from mambaify.generate.speculative_engine import SpeculativeEngine

    label = ((label or f"batch {batch}") + (f", draft head {rows} rows" if rows else "")
             + (f", {draft_weights} draft" if name_weights else ""))
    tokens = sum(o.numel() for o in reference)
    engine = SpeculativeEngine(target, draft, tokenizer, k="auto", k_choices=fixed or (4,), draft_vocab=draft_vocab,
                               max_batch_size=batch, max_length=length, compile=args.compile,
                               small_batch_linear=linear == "split-k")
    prefills_warm = False
    for k in args.k:
        if results.out_of_time(f"(a) {label} k={k}"):
            continue
        compile_before = engine.compile_seconds
        # Compile (with --compile) and capture the round graphs: every K that "auto" may pick.
        engine.generate(batches[0], max_new_tokens=4, stop_token_ids=[], k=k)
        if not prefills_warm:  # the prefill graphs serve every K
            warm_prefills(engine, batches, k=k)
            prefills_warm = True
        ks = engine.k_choices if k == "auto" else [k]
        compiled = all(engine.is_compiled(batch, kk) for kk in ks)
        times, stats = [], []
        counted = dict(engine.prefill_counts)
        for _ in range(args.repeats):
            seconds, outputs, request_stats = timed_generate(engine, batches, device, k=k, **options)
            times.append(seconds)
            stats += request_stats
        eager = eager_prefills(engine, counted, f"speculative, {label}, k={k}")
        same = sum(int((o.cpu() == r.cpu()).sum()) for o, r in zip(outputs, reference))
        acceptance = acceptance_over(stats)
        tps = tokens / statistics.median(times)
        split = split_first_token(engine, batches, device, args.repeats, statistics.median(times), tokens,
                                  k=k, **options)
        # The device's share of a round (fixed K only: "auto" mixes several).
        device_times = engine.round_times(batch, k) if k != "auto" else None
        per_repeat = acceptance["rounds"] / args.repeats
        round_ms = 1e3 * (statistics.median(times) - split["first_token_ms"] * len(batches) / 1e3) / per_repeat
        results.add("end_to_end", dict(path="speculative", batch=batch, k=k, prompts=len(batches) * batch,
                                       tokens=tokens, seconds=statistics.median(times), tokens_per_s=tps,
                                       ratio=tps / plain_tps, **split,
                                       decode_ratio=split["decode_tokens_per_s"] / plain_split["decode_tokens_per_s"],
                                       match=same / tokens, compiled=compiled, eager_prefills=eager,
                                       draft_vocab=rows or None, linear=linear, draft_weights=draft_weights,
                                       compile_s=engine.compile_seconds - compile_before, **acceptance,
                                       round_ms=round_ms, **(device_times or {})))


# ---------------------------------------------------------------------------------------------
# (b) The verify call


def graphed(fn, device: torch.device):
    """fn captured in a CUDA graph on a GPU (replays), or fn itself on the CPU."""
    if device.type != "cuda":
        return fn
    from mambaify.generate.speculative_engine import GraphedStep

    return GraphedStep(fn, torch.cuda.graph_pool_handle())


def median_seconds(step, clock: Clock, repeats: int, calls: int = 10) -> float:
    """Median over repeats of the mean time of ``calls`` back-to-back calls."""
    step()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        for _ in range(calls):
            step()
        times.append(clock.seconds(start, clock.mark()) / calls)
    return statistics.median(times)


def decode_step_seconds(model, batch: int, context: int, device, clock: Clock, repeats: int,
                        compile: bool = False, small_batch_linear: bool = False) -> float:
    """One plain decode step of the Engine (CUDA graph on a GPU; compiled first with ``compile``)
    after a prompt of ``context`` tokens."""
    from mambaify.bench import random_ids, time_decode
    from mambaify.generate.engine import Engine

    steps = 16
    engine = Engine(model, max_batch_size=batch, max_length=context + steps + 1, compile=compile,
                    small_batch_linear=small_batch_linear)
    prompt = random_ids(batch, context, model.config.vocab_size, 0, device)
    first = engine.prefill(prompt)[:, -1].argmax(-1)
    times = time_decode(engine, first, context, steps, repeats, clock)
    del engine
    return statistics.median(times) / steps


@torch.no_grad()
def verify_and_draft_seconds(target, draft, batch: int, context: int, ks: list[int], device, clock, repeats,
                             draft_vocabs: Sequence[int] = (0,)):
    """{(k, kernel): verify seconds} and {(k, head rows): draft round seconds}, from CUDA-graph replays.

    The target's verify call runs with counts = K + 1 (the previous round accepted everything, so
    the fused kernel also replays K + 1 cached tokens: the most it ever folds) and no commit, so
    that every replay does the same work. The draft round is the engine's K draft calls with argmax,
    with the whole LM head (0) and with it cut to each of ``draft_vocabs`` rows (the first ids:
    the weights are random, only the cost is measured)."""
    from mambaify.bench import random_ids
    from mambaify.generate.speculative_engine import SpeculativeStack, cut_head

    k_max = max(ks)
    prompt = random_ids(batch, context, target.config.vocab_size, 1, device)
    mask = torch.ones_like(prompt)
    slots = context + k_max + 2
    target_stack = SpeculativeStack(target, slots, k_max + 1)
    cache = target_stack.allocate_speculative(batch, target.lm_head.weight.dtype, device, store_states=True)
    target_stack.start(prompt, mask, cache)
    fused_cache = dataclasses.replace(cache, layers=[
        dataclasses.replace(layer, states=None) if hasattr(layer, "states") else layer for layer in cache.layers
    ])
    draft_stack = SpeculativeStack(draft, slots, k_max + 1)
    draft_cache = draft_stack.allocate_speculative(batch, draft.lm_head.weight.dtype, device, draft=True)
    draft_stack.start(prompt, mask, draft_cache)
    prev_real = torch.ones(batch, dtype=torch.bool, device=device)
    verify, rounds = {}, {}
    for k in ks:
        tokens = random_ids(batch, k + 1, target.config.vocab_size, 2 + k, device)
        best = torch.zeros(batch, k + 1, dtype=torch.long, device=device)
        for kernel, use in (("fused", fused_cache), ("store_states", cache)):
            use.counts.fill_(k + 1)

            def verify_call(use=use):
                best.copy_(target_stack.verify(tokens, use).argmax(-1))

            verify[(k, kernel)] = median_seconds(graphed(verify_call, device), clock, repeats)
        draft_cache.counts.fill_(k + 1)

        whole_head = draft_stack.lm_head
        for rows in draft_vocabs:
            ids = torch.arange(rows or whole_head.weight.shape[0], device=device)
            draft_stack.lm_head = cut_head(whole_head, ids) if rows else whole_head

            def draft_round(k=k, ids=ids):  # the engine's: K calls, the first over two tokens (prev, last)
                token = tokens[:, :2]
                for i in range(k):
                    token = ids[draft_stack.draft_step(token, i, draft_cache, prev_real).argmax(-1, keepdim=True)]

            rounds[(k, rows)] = median_seconds(graphed(draft_round, device), clock, repeats)
        draft_stack.lm_head = whole_head
    return verify, rounds


@torch.no_grad()
def engine_round_seconds(target, draft, batch: int, context: int, ks: list[int], device, repeats: int,
                         draft_vocabs: Sequence[int], compile: bool,
                         small_batch_linear: bool = False) -> tuple[dict, dict]:
    """What verify_and_draft_seconds measures, from the SpeculativeEngine's own rounds as
    generate() runs them (compiled with ``compile``; fused kernel): {(k, "fused"): verify
    seconds}, {(k, head rows): draft round seconds}. One engine per draft head (the first ids, as
    above); a request from a ``context``-token prompt at each K first captures (and compiles) its
    rounds and leaves that context in the caches."""
    from mambaify.bench import random_ids
    from mambaify.generate.speculative_engine import SpeculativeEngine

    prompt = random_ids(batch, context, target.config.vocab_size, 1, device)
    verify, rounds = {}, {}
    for rows in draft_vocabs:
        engine = SpeculativeEngine(target, draft, k=max(ks), k_choices=ks, max_batch_size=batch,
                                   max_length=context + 4 * (max(ks) + 1), compile=compile,
                                   draft_vocab=range(rows) if rows else None, small_batch_linear=small_batch_linear)
        for k in ks:
            engine.generate(prompt, max_new_tokens=2, stop_token_ids=[], k=k)
            times = engine.measure_rounds(batch, k, repeats=max(repeats, 5))
            verify[(k, "fused")] = times["verify_ms"] / 1e3  # the same call for every draft head
            rounds[(k, rows)] = times["draft_ms"] / 1e3
        del engine
    return verify, rounds


def tokens_per_round(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def alpha_for(accepted: float, k: int) -> float:
    """The per-token acceptance rate at which a round at K yields accepted + 1 tokens (bisection)."""
    target = min(accepted, k) + 1
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, k) < target else (lo, mid)
    return (lo + hi) / 2


# How (b) came by the acceptance at a K, in its table: measured at that K in (a); read off (a)'s
# rounds at a larger K (:func:`mambaify.generate.speculative_engine.accepted_at`); or fitted, the
# per-token rate alpha from one K carried to another. The fit is a model: carried from K = 3 to
# K = 4 in the (a) runs of sessions 4-8 it came within -3% to +11% of what was measured at K = 4
# (batch 1: -1% to +3%), so (b) takes a measured figure wherever (a) has one.
SOURCES = {"measured": "", "counts": "+", "fitted": "*"}


@dataclasses.dataclass
class Acceptance:
    """Mean accepted drafts per round at each K, for (b)'s speed-ups: ``measured`` (K -> mean
    accepted, each measured at its K, or given with --accepted), else read off ``counts`` (K ->
    rounds that accepted 0..K drafts) at a larger K, else fitted from the measured K nearest
    below (or above)."""

    label: str
    measured: dict[int, float]
    counts: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    def at(self, k: int) -> tuple[float, str]:
        """(mean accepted at K, how it was found: a key of SOURCES)."""
        from mambaify.generate.speculative_engine import accepted_at

        if k in self.measured:
            return self.measured[k], "measured"
        read = accepted_at({j: c for j, c in self.counts.items() if j > k}, k)
        if read is not None:
            return read, "counts"
        below = [j for j in self.measured if j < k]
        base = max(below) if below else min(self.measured)
        return tokens_per_round(alpha_for(self.measured[base], base), k) - 1, "fitted"


def acceptances_from(path: Path, k: int, draft_weights: str | None = None) -> list[Acceptance]:
    """The acceptance an (a) run measured: one per batch size, draft head and kind of linear
    layers (in that order) with a speculative point at K = k, each with every fixed K it ran and
    its counts of accepted drafts per round. Where two give the same figures, the first stands.
    ``draft_weights`` ('float' or 'int8', the draft (b) timed): only the points of a draft with
    those weights, where the run has any (an int8 draft's costs go with an int8 draft's acceptance)."""
    run = json.loads(path.read_text())
    run.setdefault("meta", {})
    points = [p for p in run["end_to_end"]
              if p["path"] == "speculative" and isinstance(p["k"], int) and p.get("mean_accepted") is not None]
    kinds = {draft_weights_of(p, run["meta"]) for p in points}
    if draft_weights in kinds:
        points = [p for p in points if draft_weights_of(p, run["meta"]) == draft_weights]
    weights_label = len(kinds) > 1 or (draft_weights is not None and kinds != {draft_weights})

    def setting(p: dict) -> tuple:
        return p["batch"], p.get("draft_vocab") or 0, p.get("linear") or "", draft_weights_of(p, run["meta"])

    settings = sorted({setting(p) for p in points if p["k"] == k})
    if not settings:
        raise SystemExit(f"{path} has no speculative point at K={k} with a mean accepted length: "
                         f"pick an --accepted-k the (a) run measured, or pass --accepted")
    found: dict[tuple, Acceptance] = {}
    for batch, rows, linear, weights in settings:
        mine = [p for p in points if setting(p) == (batch, rows, linear, weights)]
        measured = {p["k"]: round(p["mean_accepted"], 3) for p in mine}
        counts = {int(j): c for p in mine for j, c in (p.get("accepted_counts") or {}).items()}
        what = ", ".join([f"batch {batch}"] + ([f"draft head {rows} rows"] if rows else [])
                         + ([linear] if len({s[2] for s in settings}) > 1 else [])
                         + ([f"{weights} draft"] if weights_label else []))
        key = (tuple(sorted(measured.items())), tuple(sorted((j, tuple(c)) for j, c in counts.items())))
        found.setdefault(key, Acceptance(f"(a) {what}: {measured[k]:g} at K={k}", measured, counts))
    return list(found.values())


def given_acceptances(lengths: Sequence[float], k: int) -> list[Acceptance]:
    """--accepted A1,A2 at --accepted-k K: each fitted to every other K."""
    return [Acceptance(f"{a:g} at K={k}", {k: a}) for a in lengths]


def speedup_points(cost: dict, acceptances: Sequence[Acceptance]) -> list[dict]:
    """The speed-up over plain decoding that one verify_cost point gives at each acceptance:
    (accepted + 1) tokens per round x decode step / (verify + draft round), the acceptance at
    the point's K as :meth:`Acceptance.at` finds it."""
    points = []
    for acceptance in acceptances:
        accepted, source = acceptance.at(cost["k"])
        points.append(dict(
            attention=cost["attention"], batch=cost["batch"], k=cost["k"], kernel=cost["kernel"],
            compiled=cost.get("compiled", False), draft_vocab=cost.get("draft_vocab"),
            acceptance=acceptance.label, accepted=accepted, accepted_source=source, tokens_per_round=accepted + 1,
            speedup=(accepted + 1) * cost["decode_step_ms"] / (cost["verify_ms"] + cost["draft_round_ms"]),
        ))
    return points


def run_verify_cost(args, results: Results, device: torch.device, dtype: torch.dtype) -> None:
    import mambaify
    from mambaify.bench import build_teacher, free_memory, materialise_on
    from mambaify.convert import attention_layers_for
    from mambaify.draft import build_draft_from_teacher

    clock = Clock(device)
    family = "tiny" if args.tiny else args.shape
    current = build_teacher(family, device, dtype, seed=args.seed)
    draft = build_draft_from_teacher(current).eval()  # layers [0, last], embeddings and head
    if args.draft_int8:
        quantize_int8(draft)
    num_layers = current.config.num_hidden_layers
    for fraction in sorted(set(args.attention), reverse=True):  # each hybrid converts the one before
        if results.out_of_time(f"(b) attention {fraction}"):
            continue
        layers = attention_layers_for(num_layers, fraction)
        with materialise_on(device, dtype):  # the hybrid is created where it runs
            current = mambaify.convert(current, attention=layers, seed=args.seed).eval()
        free_memory()
        for batch in args.verify_batch:
            what = f"(b) attention {fraction} batch {batch}"
            if results.out_of_time(what):
                continue
            try:
                decode_s = decode_step_seconds(current, batch, args.context, device, clock, args.repeats,
                                               compile=args.compile,
                                               small_batch_linear=args.small_batch_linear and args.compile)
                if args.compile:
                    verify, rounds = engine_round_seconds(current, draft, batch, args.context, args.verify_k,
                                                          device, args.repeats, args.draft_vocab, compile=True,
                                                          small_batch_linear=args.small_batch_linear)
                else:
                    verify, rounds = verify_and_draft_seconds(current, draft, batch, args.context, args.verify_k,
                                                              device, clock, args.repeats, args.draft_vocab)
            except torch.OutOfMemoryError as err:
                results.data["skipped"].append({"point": what, "reason": str(err).splitlines()[0][:200]})
                free_memory()
                continue
            for (k, kernel), verify_s in sorted(verify.items()):
                for rows in args.draft_vocab:
                    draft_s = rounds[(k, rows)] if args.draft_step_ms is None else k * args.draft_step_ms / 1e3
                    cost = dict(
                        attention=fraction, batch=batch, k=k, kernel=kernel, context=args.context,
                        draft_vocab=rows or None, verify_ms=1e3 * verify_s, decode_step_ms=1e3 * decode_s,
                        decode_steps_ms=1e3 * (k + 1) * decode_s,
                        verify_over_decode_steps=verify_s / ((k + 1) * decode_s), draft_round_ms=1e3 * draft_s,
                        compiled=args.compile,
                    )
                    results.add("verify_cost", cost)
                    for point in speedup_points(cost, args.acceptances):
                        results.add("speedup", point)
            free_memory()


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _kernel(point: dict) -> str:
    return point["kernel"] + (" (compiled)" if point.get("compiled") else "")


def _round_ms(point: dict) -> str:
    """'wall (draft + verify)' per round, '-' where not recorded (plain points, older runs)."""
    if "round_ms" not in point:
        return "-"
    if "verify_ms" not in point:
        return f"{point['round_ms']:.2f}"
    return f"{point['round_ms']:.2f} ({point['draft_ms']:.2f} + {point['verify_ms']:.2f})"


def _draft(p: dict, meta: dict) -> str:
    """(a)'s draft column: its head's rows ('all' uncut) and its weights."""
    return f"{p.get('draft_vocab') or 'all'}, {draft_weights_of(p, meta)}"


def _accepted_counts_table(points: list[dict], meta: dict) -> list[str]:
    """(a)'s distribution of accepted drafts per round at each fixed K (share of (row, round)
    pairs), where the points recorded it."""
    rows = [(p, int(k), counts) for p in points if p["path"] == "speculative" and isinstance(p["k"], int)
            for k, counts in (p.get("accepted_counts") or {}).items() if int(k) == p["k"] and sum(counts)]
    if not rows:
        return []
    most = max(k for _, k, _ in rows)
    lines = ["Drafts accepted per round, share of the rounds of each row:", "",
             "| batch | K | linear layers | draft head rows, weights | rounds | " + " | ".join(str(n) for n in range(most + 1)) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in range(most + 1)) + " |"]
    for p, k, counts in rows:
        total = sum(counts)
        shares = [f"{c / total:.3f}" for c in counts] + ["-"] * (most - k)
        lines.append(f"| {p['batch']} | {k} | {p.get('linear') or '-'} | {_draft(p, meta)} | {total} | "
                     + " | ".join(shares) + " |")
    return lines + [""]


def render(data: dict, out: Path) -> None:
    folded = "; norms folded into the split-K GEMVs" if data["meta"].get("fold_norms") else ""
    if data["meta"].get("fused_conv_step"):
        folded += "; the plain engine's conv step inside its SSD step"
    if data["meta"].get("draft_int8"):
        folded += "; the draft's layers in int8"
    lines = ["# Speculative decoding benchmark", "", f"Device: {data['meta'].get('device_name')}, "
             f"dtype {data['meta'].get('dtype')}, torch {data['meta'].get('torch')}{folded}.", ""]
    if data["end_to_end"]:
        lines += ["## (a) End to end: plain engine vs speculative", "",
                  "| batch | path | K | compiled | linear layers | draft head rows, weights | tokens/s | ratio | "
                  "first token ms | decode tokens/s | decode ratio | mean accepted | tokens/round | match | "
                  "K used | round ms: wall (device draft + verify) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in data["end_to_end"]:
            # Points of runs before the first-token split have no such fields.
            first = f"{p['first_token_ms']:.1f}" if "first_token_ms" in p else "-"
            decode = f"{p['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in p else "-"
            decode_ratio = f"{p['decode_ratio']:.2f}" if "decode_ratio" in p else "-"
            head = "-" if p["path"] == "plain" else _draft(p, data["meta"])
            # Points of runs before --e2e-linear: their run's --small-batch-linear.
            linear = p.get("linear") or ("split-k" if data["meta"].get("small_batch_linear") else "modules")
            lines.append(f"| {p['batch']} | {p['path']} | {_fmt(p['k'])} | {_fmt(p.get('compiled'))} | {linear} | {head} | "
                         f"{p['tokens_per_s']:.1f} | {p['ratio']:.2f} | {first} | {decode} | {decode_ratio} | "
                         f"{_fmt(p.get('mean_accepted'))} | "
                         f"{_fmt(p.get('tokens_per_round'))} | {_fmt(p.get('match'))} | {_fmt(p.get('k_used'))} | "
                         f"{_round_ms(p)} |")
        lines.append("")
        lines += _accepted_counts_table(data["end_to_end"], data["meta"])
    if data["verify_cost"]:
        lines += ["## (b) One verify call over K+1 tokens vs K+1 plain decode steps", "",
                  "| attention | batch | K | kernel | verify ms | K+1 decode steps ms | ratio | draft head rows | "
                  "draft round ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in data["verify_cost"]:
            lines.append(f"| {p['attention']:g} | {p['batch']} | {p['k']} | {_kernel(p)} | {p['verify_ms']:.3f} | "
                         f"{p['decode_steps_ms']:.3f} | {p['verify_over_decode_steps']:.3f} | "
                         f"{p.get('draft_vocab') or 'all'} | {p['draft_round_ms']:.3f} |")
        ks = sorted({p["k"] for p in data["speedup"]})
        lines += ["", "## (b) Speed-up over plain decoding at the acceptance measured in (a) (or given)", "",
                  "Each cell: the speed-up (the mean accepted drafts per round at that K it assumes).", "",
                  "| attention | batch | kernel | draft head rows | acceptance | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in ks) + " |"]
        groups: dict = {}
        for p in data["speedup"]:
            key = (p["attention"], p["batch"], _kernel(p), p.get("draft_vocab"), p["acceptance"])
            groups.setdefault(key, {})[p["k"]] = p
        for (attention, batch, kernel, rows, acceptance), by_k in groups.items():
            cells = " | ".join(f"{by_k[k]['speedup']:.2f}x ({by_k[k]['accepted']:.2f}"
                               f"{SOURCES[by_k[k]['accepted_source']]})" if k in by_k else "-" for k in ks)
            lines.append(f"| {attention:g} | {batch} | {kernel} | {rows or 'all'} | {acceptance} | {cells} |")
        lines += ["", "The acceptance at each K: measured at that K in (a) (or given); + read off (a)'s rounds at a "
                      "larger K, each counted as min(accepted, K); * fitted, a per-token rate carried from another K "
                      "(a model: within -3% to +11% of measurement from K = 3 to 4 in sessions 4-8).", ""]
    if data["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{s['point']} ({s['reason']})" for s in data["skipped"]), ""]
    (out / "bench_speculative.md").write_text("\n".join(lines))
    plot(data, out / "bench_speculative.png")


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot", flush=True)
        return
    panels = [p for p in ("end_to_end", "verify_cost", "speedup") if data[p]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "end_to_end":
            def line(p: dict) -> tuple:  # plain points head every draft's line
                weights = draft_weights_of(p, data["meta"]) if p["path"] == "speculative" else None
                return p["batch"], p.get("linear") or "modules", weights

            # One line per draft, or the plain points alone where every speculative one was skipped.
            lines_of = sorted({line(p) for p in data[panel] if p["path"] == "speculative"}
                              or {line(p) for p in data[panel]})
            several_linear = len({linear for _, linear, _ in lines_of}) > 1
            several_weights = len({weights for _, _, weights in lines_of}) > 1
            for batch, linear, weights in lines_of:
                points = [p for p in data[panel] if line(p) in ((batch, linear, None), (batch, linear, weights))]
                ax.plot([str(p["k"]) if p["path"] == "speculative" else "plain" for p in points],
                        [p["tokens_per_s"] for p in points], "o-",
                        label=f"batch {batch}" + (f", {linear}" if several_linear else "")
                        + (f", {weights} draft" if several_weights else ""))
            ax.set(title="(a) end to end", xlabel="K", ylabel="tokens/s")
        elif panel == "verify_cost":
            for key in sorted({(p["attention"], p["batch"], p["kernel"]) for p in data[panel]}):
                points = [p for p in data[panel] if (p["attention"], p["batch"], p["kernel"]) == key]
                ax.plot([p["k"] for p in points], [p["verify_over_decode_steps"] for p in points], "o-",
                        label=f"attn {key[0]:g}, b{key[1]}, {key[2]}")
            ax.set(title="(b) verify call / (K+1) decode steps", xlabel="K", ylabel="time ratio")
        else:
            # The fused kernel only (the naive one is within a few percent, see the table): colour =
            # accepted length, line style = hybrid and batch.
            fused = [p for p in data[panel] if p["kernel"] == "fused"] or data[panel]
            labels = list(dict.fromkeys(p["acceptance"] for p in fused))
            shapes = sorted({(p["attention"], p["batch"]) for p in fused})
            styles = ["-", "--", ":", "-."]
            for c, label in enumerate(labels):
                for s_i, (attention, batch) in enumerate(shapes):
                    points = sorted((p for p in fused if (p["acceptance"], p["attention"], p["batch"])
                                     == (label, attention, batch)), key=lambda p: p["k"])
                    ax.plot([p["k"] for p in points], [p["speedup"] for p in points], marker="o", markersize=3,
                            color=f"C{c}", linestyle=styles[s_i % len(styles)],
                            label=f"{label}; attn {attention:g}, b{batch}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(title="(b) speed-up over plain decoding (fused kernel)", xlabel="K", ylabel="speed-up")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def rerender(args) -> int:
    """--from-json: the saved measurements, with (b)'s speed-ups at the accepted lengths given now."""
    data = json.loads(args.from_json.read_text())
    acceptances = given_acceptances(args.accepted, args.accepted_k)
    if args.accepted_from is not None:
        acceptances = acceptances_from(args.accepted_from, args.accepted_k,
                                       "int8" if data["meta"].get("draft_int8") else "float")
        data["meta"]["accepted_from"] = str(args.accepted_from)
    data["speedup"] = [point for cost in data["verify_cost"] for point in speedup_points(cost, acceptances)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_speculative.json").write_text(json.dumps(data, indent=1))
    render(data, args.out)
    print(f"wrote {args.out}/bench_speculative.json, .md, .png", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        return rerender(args)
    run_a = args.tiny or args.target is not None
    run_b = args.tiny or args.shape is not None
    if not (run_a or run_b):
        print("nothing to run: give --target and --draft for (a), --shape llama8b for (b), or --tiny", file=sys.stderr)
        return 2
    if args.target is not None and args.draft is None:
        print("--target needs --draft", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.shape == "llama8b" and device.type != "cuda":
        print("--shape llama8b needs a GPU (an 8B model); use --tiny on the CPU", file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    meta = dict(argv=sys.argv[1:], date=time.strftime("%Y-%m-%d"), device=str(device), dtype=str(dtype), torch=torch.__version__,
                python=platform.python_version(), compile=args.compile,
                small_batch_linear=args.small_batch_linear, fold_norms=fold_norms_default(),
                fused_conv_step=fused_conv_step_default(), draft_int8=args.draft_int8,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    if args.context is None:
        args.context = 32 if args.tiny else 512
    args.acceptances = given_acceptances(args.accepted, args.accepted_k)
    if args.accepted_from is not None:
        if args.accepted_from.exists():
            args.acceptances = acceptances_from(args.accepted_from, args.accepted_k,
                                                "int8" if args.draft_int8 else "float")
            meta["accepted_from"] = str(args.accepted_from)
        else:
            print(f"--accepted-from {args.accepted_from} does not exist: using --accepted {args.accepted}", flush=True)
    results = Results(args.out, meta, args.time_budget_s)
    torch.manual_seed(args.seed)
    status = 0
    with torch.no_grad():
        for run, part in ((run_a, run_end_to_end), (run_b, run_verify_cost)):
            if not run:
                continue
            try:
                part(args, results, device, dtype)
            except Exception:  # record the failure, still write what was measured
                traceback.print_exc()
                results.data["skipped"].append({"point": part.__name__, "reason": traceback.format_exc(limit=1)[-300:]})
                status = 1
    results.save()
    render(results.data, args.out)
    print(f"wrote {args.out}/bench_speculative.json, .md, .png", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
