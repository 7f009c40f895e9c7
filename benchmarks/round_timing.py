"""Where a speculative round's wall time goes: host against device, with the engine's fast paths
on and off. No trained weights needed: a round's cost depends on the shapes, not on what it
accepts, so random SmolLM2-shaped models (the default teacher's 50% hybrid and a draft of its
first and last layers) stand in for the trained pair of ``bench_speculative.py``.

For each batch size and K: one SpeculativeEngine (compiled with ``--compile``), then greedy
requests of ``--new-tokens`` with rounds launched ahead (``launch_ahead``, the default on CUDA)
and without, alternately; per round, the wall time (whole requests over their rounds) beside the
engine's own device timings of its draft and verify graphs (CUDA events) and the host's share
between rounds. The plain engine's step on the same target is timed the same way, per token.
A wall time per round well above draft + verify says the host, not the GPU, sets the pace.

Usage (on the H200, after ``source benchmarks/h200/env.sh``; runs on the CPU too, slowly):

    python3 benchmarks/round_timing.py --out DIR [--compile] [--batch 1,8] [--k 2,3] [--repeats 3]
    python3 benchmarks/round_timing.py --out DIR --tiny     # tiny random models (what the tests run)
    python3 benchmarks/round_timing.py --out DIR --compile --target HYBRID --draft DRAFT   # a trained pair

Writes DIR/round_timing.json (and prints one line per point).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import mambaify
from mambaify.bench import build_teacher, materialise_on, parse_list, random_ids, resolve_device, resolve_dtype
from mambaify.draft import build_draft_from_teacher
from mambaify.generate.engine import Engine
from mambaify.generate.speculative_engine import SpeculativeEngine

from bench_speculative import timed_generate  # beside this script in benchmarks/


def smollm2_shaped(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random Llama with SmolLM2-135M's shapes (30 layers of 576, 9 heads of 64, 3 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with materialise_on(device, dtype):
        return LlamaForCausalLM(config).eval()


def wall_seconds(engine, prompt: torch.Tensor, device: torch.device, repeats: int, **options) -> float:
    """Median wall time of one request (bench_speculative's timing: synchronised before and after)."""
    return statistics.median(timed_generate(engine, [prompt], device, **options)[0] for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=lambda s: parse_list(s, int), default=[1, 8])
    p.add_argument("--k", type=lambda s: parse_list(s, int), default=[2, 3])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2's shapes")
    p.add_argument("--target", help="a saved target instead of the random one (with --draft): the same timings "
                                    "on trained weights, which accept drafts, from the same random prompt")
    p.add_argument("--draft", help="the saved draft for --target")
    args = p.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        p.error("--target and --draft go together")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.target:
        from mambaify.generate.loading import load_for_generation

        target, _ = load_for_generation(args.target, device=str(device), dtype=str(dtype).split(".")[-1])
        draft, _ = load_for_generation(args.draft, device=str(device), dtype=str(dtype).split(".")[-1])
    else:
        teacher = build_teacher("tiny", device, dtype) if args.tiny else smollm2_shaped(device, dtype)
        draft = build_draft_from_teacher(teacher).eval()
        target = mambaify.convert(teacher, attention=0.5).eval()
    length = args.prompt_tokens + args.new_tokens
    options = dict(max_new_tokens=args.new_tokens, stop_token_ids=[])
    points = []

    def add(point: dict) -> None:
        points.append(point)
        print(json.dumps(point), flush=True)
        (out / "round_timing.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__, compile=args.compile, points=points), indent=1))

    for batch in args.batch:
        prompt = random_ids(batch, args.prompt_tokens, target.config.vocab_size, 0, device)
        plain = Engine(target, max_batch_size=batch, max_length=length, compile=args.compile)
        plain.generate(prompt, max_new_tokens=4, stop_token_ids=[])
        seconds = wall_seconds(plain, prompt, device, args.repeats, **options)
        add(dict(engine="plain", batch=batch, ms_per_token=1e3 * seconds / args.new_tokens,
                 compiled=plain.is_compiled(batch)))
        plain = None  # frees its graphs and cache before the speculative engines
        for k in args.k:
            engine = SpeculativeEngine(target, draft, k=k, k_choices=(k,), max_batch_size=batch, max_length=length,
                                       compile=args.compile)
            engine.generate(prompt, max_new_tokens=4, stop_token_ids=[])
            for ahead in (True, False, True, False):  # alternated, so that drift shows
                engine.launch_ahead = ahead and device.type == "cuda"
                seconds = wall_seconds(engine, prompt, device, args.repeats, **options)
                rounds = engine.stats.rounds
                add(dict(engine="speculative", batch=batch, k=k, launch_ahead=engine.launch_ahead,
                         compiled=engine.is_compiled(batch, k), rounds=rounds,
                         tokens_per_round=engine.stats.emitted / max(engine.stats.row_rounds, 1),
                         ms_per_round=1e3 * seconds / rounds, **engine.round_times(batch, k)))
            engine = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
