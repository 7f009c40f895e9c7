"""Where a speculative round's device time goes, kernel by kernel, beside the plain decode step.

Session 9 measured the default teacher's 50% hybrid on the H200, compiled: a plain step 1.21 ms,
a verify round over K + 1 = 4 tokens 1.43 ms, a draft round of 3 steps 0.37 ms. The verify
round's 0.22 ms over the step decides the end-to-end target (a round costs 1.5 plain steps); this
script says which kernels it is made of. A round's cost depends on the shapes, not on what it
accepts, so random SmolLM2-shaped models (as in ``round_timing.py``) stand in for the trained pair.
``--shape llama8b``: the 8B-shaped pair of issue 5's (b) instead (``bench_speculative.py --shape
llama8b``: a random Llama-3-8B-shaped teacher, its hybrid, the draft of its first and last layers,
with ``--draft-vocab 32768`` the draft's LM head cut to that many rows), to see which kernels make
the verify call's cost over the plain step and the draft round's over its roofline.

For the plain engine's decode step, the speculative engine's draft round and its verify round
(compiled with ``--compile``, as the engines run them), each run ``--calls`` times under
torch.profiler, replayed from its CUDA graph as the engines run it (on CUDA; the profiler sees
the kernels inside a replay) or without a graph (on the CPU, or with ``--eager`` too): the
kernels' device time per call grouped by kind (the groups of ``profile_decode.py``), the number
of kernels, and every kernel; and the graph's replay timed with CUDA events. Each engine compiles
its own code (about a minute per engine on the H200). The plain step is timed as ``mambaify
bench`` times it, with its argmax and input copies.

Usage (on the H200, after ``source benchmarks/h200/env.sh``; ``--tiny`` runs anywhere):

    python3 benchmarks/profile_rounds.py --out DIR [--compile] [--small-batch-linear] [--batch 1] [--k 3] [--eager]
    python3 benchmarks/profile_rounds.py --out DIR --shape llama8b --draft-vocab 32768 --compile --small-batch-linear \
        --prompt-tokens 512 --calls 8

Writes DIR/profile_rounds.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mambaify
from mambaify.bench import Clock, build_teacher, materialise_on, random_ids, resolve_device, resolve_dtype
from mambaify.draft import build_draft_from_teacher
from mambaify.generate.quantize import quantize_int8
from mambaify.generate.engine import COMPILE_MODES, Engine
from mambaify.generate.sampling import SamplingParams
from mambaify.generate.speculative_engine import SpeculativeEngine

from profile_decode import kernel_table  # beside this script in benchmarks/
from round_timing import smollm2_shaped

TOP_KERNELS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=3, help="draft tokens per round (the verify round runs K + 1)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="context before the profiled calls (default 48)")
    p.add_argument("--calls", type=int, default=16, help="profiled calls of each kind (default 16)")
    p.add_argument("--compile", action="store_true", help="the step and the rounds through torch.compile")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--small-batch-linear", action="store_true",
                   help="linear layers through mambaify's split-K GEMV in both engines")
    p.add_argument("--attention", type=float, default=0.5, help="the target's attention fraction (default 0.5)")
    p.add_argument("--eager", action="store_true",
                   help="on CUDA, also profile each call without its graph (engines of their own, compiled "
                        "again: session 10's run of both timed out in 200 s per linear-layer setting)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of SmolLM2's shapes")
    p.add_argument("--shape", choices=["smollm2", "llama8b"], default="smollm2",
                   help="the random models' shapes: SmolLM2-135M's (default), or Llama-3-8B's (a GPU's worth)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="cut the draft's LM head to its first N rows (SpeculativeEngine(draft_vocab=...)); 0: whole")
    p.add_argument("--draft-int8", action="store_true", help="the draft's layers in int8 (--draft-int8 of generate)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    return p


def profiled(fn, calls: int, device: torch.device) -> tuple[dict, list, int]:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # anything lazy (a first compile, autotuning) happens outside the profile
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    return kernel_table(prof, calls, cuda)


def timed_ms(fn, calls: int, clock: Clock) -> float:
    """Median ms of ``calls`` calls, each timed alone (CUDA events, or the host clock)."""
    fn()
    times = []
    for _ in range(calls):
        start = clock.mark()
        fn()
        times.append(clock.seconds(start, clock.mark()))
    return 1e3 * statistics.median(times)


def plain_step(target, args, prompt, use_cuda_graph: bool):
    """The plain engine past its prefill and a few steps; a function that runs one decode step
    (the next slot each time; the engine is sized for every call this script makes)."""
    engine = Engine(target, max_batch_size=args.batch, max_length=prompt.shape[1] + 4 * args.calls + 16,
                    use_cuda_graph=use_cuda_graph, compile=args.compile, compile_mode=args.compile_mode,
                    small_batch_linear=args.small_batch_linear)
    tokens = engine.prefill(prompt)[:, -1].argmax(-1)

    def step():
        nonlocal tokens
        tokens = engine.decode_greedy(tokens)

    for _ in range(2):
        step()
    return engine, step


def rounds(target, draft, args, prompt, use_cuda_graph: bool):
    """The speculative engine after one short request at this batch size and K (its rounds
    compiled and captured, the caches holding the prompt), and its draft and verify round as
    functions. The rows are marked finished, so a call commits nothing and every call reads the
    same context (as SpeculativeEngine.measure_rounds times them)."""
    engine = SpeculativeEngine(target, draft, k=args.k, k_choices=(args.k,), max_batch_size=args.batch,
                               max_length=prompt.shape[1] + 32, use_cuda_graph=use_cuda_graph,
                               compile=args.compile, compile_mode=args.compile_mode,
                               small_batch_linear=args.small_batch_linear,
                               draft_vocab=range(args.draft_vocab) if args.draft_vocab else None)
    engine.generate(prompt, max_new_tokens=8, stop_token_ids=[])
    program = engine._program(args.batch, args.k, SamplingParams())
    engine.buffers.active[: args.batch].zero_()
    return engine, program


def render(results: dict) -> str:
    profiles = [(r["call"], label, r[label], r["graphed_ms"]) for r in results["calls"]
                for label in ("eager", "graphed") if label in r]
    kinds = sorted({k for _, _, p, _ in profiles for k in p["by_kind_ms"]})
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["# Speculative rounds, kernel by kernel", "", results["header"], "",
             "| call | profiled | graphed ms | kernels per call | kernel ms per call | " + " | ".join(kinds) + " |",
             "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for call, label, p, graphed_ms in profiles:
        lines.append(f"| {call} | {label} | {fmt(graphed_ms)} | {p['kernels_per_call']} | {fmt(p['kernel_ms_per_call'])} | "
                     + " | ".join(fmt(p["by_kind_ms"].get(k, 0.0)) for k in kinds) + " |")
    lines += ["", "graphed ms: one call replayed from its CUDA graph (median, CUDA events). profiled: the call run "
              "without its graph (eager; compiled code where compiled) or its graph replayed (graphed) under "
              "torch.profiler; the kernel columns are device time per call by kind (where the profiler sees "
              "inside a graph's replay)."]
    for call, label, p, _ in profiles:
        lines += ["", f"## {call}, {label}: costliest kernels", "",
                  "| kernel | kind | ms per call | launches per call | us each |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| `{k['name']}` | {k['kind']} | {k['ms_per_call']:.4f} | {k['calls_per_call']:g} | {k['us_each']:.1f} |"
                  for k in p["kernels"][:TOP_KERNELS]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny or args.shape == "llama8b":
        if args.shape == "llama8b" and device.type != "cuda":
            print("--shape llama8b needs a GPU (an 8B model); --tiny runs anywhere", file=sys.stderr)
            return 2
        teacher = build_teacher("tiny" if args.tiny else "llama8b", device, dtype)
    else:
        teacher = smollm2_shaped(device, dtype)
    draft = build_draft_from_teacher(teacher).eval()  # layers [0, last], the embeddings and the head
    if args.draft_int8:
        quantize_int8(draft)
    with materialise_on(device, dtype):  # an 8B hybrid is made where it runs, not on the host first
        target = mambaify.convert(teacher, attention=args.attention).eval()
    del teacher
    prompt = random_ids(args.batch, args.prompt_tokens, target.config.vocab_size, 0, device)
    clock = Clock(device)
    cuda = device.type == "cuda"
    shapes = {"smollm2": "SmolLM2", "llama8b": "Llama-3-8B"}
    header = (f"Device: {torch.cuda.get_device_name(device) if cuda else 'CPU'}; torch {torch.__version__}; {dtype}; "
              f"{'tiny random models' if args.tiny else f'random {shapes[args.shape]}-shaped models'}, target "
              f"{args.attention:.0%} attention, draft of the teacher's first and last layers"
              f"{f' (LM head cut to {args.draft_vocab} rows)' if args.draft_vocab else ''}"
              f"{', its layers in int8' if args.draft_int8 else ''}; batch {args.batch}, "
              f"K = {args.k}, {args.prompt_tokens}-token context; {args.calls} profiled calls each"
              f"{'; compiled (' + args.compile_mode + ')' if args.compile else ''}"
              f"{'; split-K GEMV linear layers' if args.small_batch_linear else ''}.")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "header": header, "calls": []}

    def add(call: str, runs: dict) -> None:
        entry = {"call": call, "graphed_ms": timed_ms(runs["graphed"], args.calls, clock) if "graphed" in runs else None}
        for label, run in runs.items():
            by_kind, kernels, launches = profiled(run, args.calls, device)
            entry[label] = {"kernels_per_call": launches, "kernel_ms_per_call": sum(by_kind.values()),
                            "by_kind_ms": by_kind, "kernels": kernels}
        results["calls"].append(entry)
        print(f"{call}: graphed {entry['graphed_ms']} ms; " + "; ".join(
            f"{label}: {entry[label]['kernels_per_call']} kernels per call, {entry[label]['kernel_ms_per_call']:.3f} ms "
            "of kernels" for label in runs), flush=True)
        (args.out / "profile_rounds.json").write_text(json.dumps(results, indent=1))
        (args.out / "profile_rounds.md").write_text(render(results))

    # The graph's replay is what the engines run (and the profiler sees inside it); without the
    # graph only on the CPU, or on request.
    modes = {"graphed": True} if cuda else {}
    if not cuda or args.eager:
        modes["eager"] = False
    with torch.no_grad():
        add("plain decode step", {label: plain_step(target, args, prompt, graphs)[1] for label, graphs in modes.items()})
        programs = {label: rounds(target, draft, args, prompt, graphs)[1] for label, graphs in modes.items()}
        add(f"draft round (K = {args.k})", {label: program.draft for label, program in programs.items()})
        add(f"verify round ({args.k + 1} tokens)", {label: program.verify for label, program in programs.items()})
    print(f"wrote {args.out}/profile_rounds.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
