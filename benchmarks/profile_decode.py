"""Where a decode step's time goes: the engine's decode step of a teacher and its hybrids under
torch.profiler, its kernels grouped by kind, beside the graphed step's time and its HBM roofline.

Usage (on the H200, after ``source benchmarks/h200/env.sh``; ``--family tiny`` runs anywhere):

    python3 benchmarks/profile_decode.py --out DIR [--family llama8b] [--attention 1,0.25]
        [--batch 1] [--context 1024] [--steps 16] [--compile [--compile-mode max-autotune-no-cudagraphs]]

For each model: the step replayed from its CUDA graph, timed with CUDA events (what `mambaify
bench` reports), then ``--steps`` eager steps under the profiler. The kernels' device time per
step, grouped (inductor's fused kernels, Mamba kernels, attention, matmul, norms, copies and
indexing, elementwise, other),
against the graphed step tells kernel time from the gaps between kernels: at batch 1 the 8B
step ran at 47-61% of its roofline uncompiled and 68-77% compiled (BENCHMARKS.md), and this says which part to fuse or speed
up. On the CPU (tiny family) the profiler sees CPU ops instead (self time of aten ops, views
included), and there is no graph and no roofline.
Writes DIR/profile_decode.json and .md (the table, and each model's 15 costliest kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mambaify.bench import (
    BenchOptions,
    Clock,
    decode_step_bytes,
    decode_weight_bytes,
    layer_shapes,
    measure_copy_bandwidth,
    model_label,
    models_of,
    parse_list,
    random_ids,
    resolve_device,
    resolve_dtype,
)
from mambaify.generate.engine import COMPILE_MODES, Engine, fold_norms_default, fused_conv_step_default

# First match wins: inductor's fused kernels (--compile) by their prefix, then Mamba and attention
# kernels before the generic names their kernels contain.
KINDS = [
    # A matmul that inductor generated itself (max-autotune turns batch-1 matmuls into reductions
    # fused with the norm or activation around them): its time is matmul time for the TB/s.
    ("inductor-matmul", r"^triton_(poi|red|per|tem)_.*_(mm|addmm|bmm)(_|$)"),
    ("inductor-fused", r"^triton_(poi|red|per|tem)_"),
    ("mamba", r"ssd|conv_step|conv1d|causal_conv|verify|mamba|gated_rmsnorm"),
    ("attention", r"attention|attn|flash|split_k|sdpa|softmax"),
    ("matmul", r"gemm|gemv|sum_splits|matmul|\bmm\b|addmm|linear|cutlass|cublas|sm90_|nvjet"),
    ("norm", r"rms|norm"),
    ("copy/index", r"copy|cat|index|scatter|gather|fill|clone|contiguous|to_copy|slice|memcpy|memset"),
    ("elementwise", r"elementwise|vectorized|reduce|mul|add|silu|sigmoid|exp|rsqrt|pow|mean|neg|where"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """What the step's matmuls must read: every nn.Linear weight (the LM head included), once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel() * module.weight.element_size()
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--family", default="llama8b", choices=["llama8b", "smollm2", "tiny"])
    p.add_argument("--attention", default="1,0.25", help="attention fractions (default 1,0.25)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16, help="profiled eager steps (default 16)")
    p.add_argument("--compile", action="store_true", help="the engine's decode step through torch.compile")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="inductor's mode with --compile (max-autotune-no-cudagraphs: Triton matmul templates timed "
                        "against cuBLAS per shape)")
    p.add_argument("--small-batch-linear", action="store_true",
                   help="the engine's linear layers through mambaify's split-K GEMV (Engine(small_batch_linear=True))")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    return p


def started_engine(model, args, device, use_cuda_graph) -> tuple[Engine, torch.Tensor]:
    """An engine past its prefill of ``--context`` random tokens and 4 warm-up steps (Triton's
    compiles, inductor's with --compile, the graph capture), and the next tokens to feed."""
    engine = Engine(model, max_batch_size=args.batch, max_length=args.context + 2 * args.steps + 8,
                    use_cuda_graph=use_cuda_graph, compile=args.compile, compile_mode=args.compile_mode,
                    small_batch_linear=args.small_batch_linear)
    tokens = engine.prefill(random_ids(args.batch, args.context, model.config.vocab_size, 0, device))[:, -1].argmax(-1)
    for _ in range(4):
        tokens = engine.decode_greedy(tokens)
    return engine, tokens


def graphed_step_ms(model, args, device, clock) -> float | None:
    """The decode step as `mambaify bench` times it: replayed from its CUDA graph (CUDA only)."""
    if device.type != "cuda":
        return None
    engine, tokens = started_engine(model, args, device, use_cuda_graph=True)
    start = clock.mark()
    for _ in range(args.steps):
        tokens = engine.decode_greedy(tokens)
    return 1e3 * clock.seconds(start, clock.mark()) / args.steps


def profiled_step(model, args, device) -> tuple[dict, list, int]:
    """Per-step device time by kind (ms), the costliest kernels, kernel launches per step."""
    engine, tokens = started_engine(model, args, device, use_cuda_graph=False)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            tokens = engine.decode_greedy(tokens)
        if cuda:
            torch.cuda.synchronize(device)
    by_kind, kernels, launches = kernel_table(prof, args.steps, cuda)
    top = [{"name": k["name"], "kind": k["kind"], "ms_per_step": k["ms_per_call"], "calls_per_step": k["calls_per_call"]}
           for k in kernels[:15]]
    return by_kind, top, launches


def kernel_table(prof, calls: int, cuda: bool) -> tuple[dict, list, int]:
    """From a profile of ``calls`` calls: device time per call by kind (ms), every kernel
    (costliest first: its ms and launches per call, us per launch), kernels launched per call.
    On the CPU the profiler sees aten ops instead: their self time, so that an op calling others
    does not count twice."""
    by_kind, kernels, launches = defaultdict(float), [], 0
    for event in prof.key_averages():
        if cuda:
            us = event.self_device_time_total
            if event.device_type != torch.autograd.DeviceType.CUDA or us <= 0:
                continue
        else:
            us = event.self_cpu_time_total
            if not event.key.startswith("aten::") or us <= 0:
                continue
        ms = us / 1e3 / calls
        by_kind[kind_of(event.key)] += ms
        kernels.append({"name": event.key[:120], "kind": kind_of(event.key), "ms_per_call": ms,
                        "calls_per_call": event.count / calls, "us_each": us / event.count})
        launches += event.count
    kernels.sort(key=lambda k: -k["ms_per_call"])
    return dict(by_kind), kernels, round(launches / calls)


MATMUL_KINDS = ("matmul", "inductor-matmul")


def matmul_tb_per_s(m: dict) -> float | None:
    """Every linear weight's bytes over the time of the kernels that compute the matmuls (library
    matmuls and inductor's own, the latter with the small ops fused into them)."""
    ms = sum(m["by_kind_ms"].get(kind, 0.0) for kind in MATMUL_KINDS)
    return m["linear_weight_bytes"] / ms / 1e9 if ms > 0 and "linear_weight_bytes" in m else None


def render(results: dict) -> str:
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = ["# Decode step profile", "", results["header"], "",
             "| model | batch | context | graphed step ms | roofline ms | kernels per step | kernel time per step ms | "
             + " | ".join(kinds) + " | matmul TB/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " | ---: |"]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    for m in results["models"]:
        lines.append(f"| {m['model']} | {m['batch']} | {m['context']} | {fmt(m['graphed_step_ms'])} | "
                     f"{fmt(m['roofline_ms'])} | {m['kernels_per_step']} | {fmt(m['kernel_ms_per_step'])} | "
                     + " | ".join(fmt(m["by_kind_ms"].get(k, 0.0)) for k in kinds) + f" | {fmt(matmul_tb_per_s(m))} |")
    lines += ["", "matmul TB/s: the bytes of every linear layer's weight over the matmul kernels' time (library "
              "matmuls and inductor's own, which carry the norms and activations fused into them), against "
              f"the copy bandwidth of {fmt(results.get('bandwidth_tb_per_s'))} TB/s (at batch 1 the matmuls "
              "are matrix-vector products, bound by reading their weights)."]
    for m in results["models"]:
        lines += ["", f"## {m['model']}: costliest kernels", "", "| kernel | kind | ms per step | calls per step |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| `{k['name']}` | {k['kind']} | {k['ms_per_step']:.4f} | {k['calls_per_step']:g} |"
                  for k in m["top_kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    fractions = parse_list(args.attention, float)
    options = BenchOptions(out=args.out, families=[args.family], attention=fractions, batches=[args.batch],
                           contexts=[args.context], compile=args.compile, compile_mode=args.compile_mode)
    clock = Clock(device)
    bandwidth = measure_copy_bandwidth(device)
    header = (f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch "
              f"{torch.__version__}; {dtype}; family {args.family}; {args.steps} profiled eager steps"
              f"{'; compiled step' if args.compile else ''}"
              f"{'; linear layers through the split-K GEMV' if args.small_batch_linear else ''}"
              f"{', norms folded into them' if fold_norms_default() else ''}"
              f"{'; conv step inside the SSD step' if fused_conv_step_default() else ''}"
              ". Kernel times are "
              "device time (CPU time of "
              "aten ops on the CPU), per step; the graphed step is the CUDA-graph replay `mambaify bench` times.")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "header": header, "models": [],
               "bandwidth_tb_per_s": bandwidth / 1e12 if bandwidth else None}
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for fraction, model in models_of(args.family, options, device, dtype):
            slots = args.context + 1
            roofline = None
            if bandwidth:
                weights = decode_weight_bytes(model, args.batch)
                step_bytes = decode_step_bytes(weights, layer_shapes(model), args.batch, slots, dtype)
                roofline = 1e3 * step_bytes / bandwidth
            graphed = graphed_step_ms(model, args, device, clock)
            by_kind, top, launches = profiled_step(model, args, device)
            results["models"].append({
                "model": model_label(fraction), "batch": args.batch, "context": args.context,
                "graphed_step_ms": graphed, "roofline_ms": roofline, "kernels_per_step": launches,
                "kernel_ms_per_step": sum(by_kind.values()), "by_kind_ms": by_kind, "top_kernels": top,
                "linear_weight_bytes": linear_weight_bytes(model),
            })
            print(f"{model_label(fraction)}: graphed {graphed} ms, roofline {roofline} ms, "
                  f"{launches} kernels per step, {sum(by_kind.values()):.3f} ms of kernels", flush=True)
            (args.out / "profile_decode.json").write_text(json.dumps(results, indent=1))
            (args.out / "profile_decode.md").write_text(render(results))
    print(f"wrote {args.out}/profile_decode.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
