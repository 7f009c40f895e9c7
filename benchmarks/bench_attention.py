"""Time decode / verify attention over a static KV cache on a GPU: our flash-decoding kernel
(mambaify.ops.attention.decode_attention) against the generation engine's current path (SDPA with
a boolean mask over every slot); write JSON and a markdown table.

Usage (on the H200, after ``source benchmarks/h200/env.sh``; about two minutes):

    python3 benchmarks/bench_attention.py --out OUT_DIR [--batch 1,16,64] [--context 1024,8192,32768]
        [--tokens 1,5] [--fill 1.0] [--heads 32 --kv-heads 8 --head-dim 128] [--rep 50]

Shape: one attention layer of a Llama-3-8B-shaped model (32 query heads, 8 kv heads, head dim
128, bf16), a cache of ``context`` slots per row, t new tokens per row (t = 1: a decode step;
t = 5: a speculative verify call with 4 drafts). The first ``fill`` * context slots of each row
hold the sequence, its last t slots are the new tokens (fill 1.0: the cache is full, the worst
case for both paths; below 1.0 the SDPA path still reads every slot, ours only the valid ones).

Both paths are timed in CUDA graphs (triton.testing.do_bench_cudagraph, median ms per call), as
the engine replays its decode step. The graph cycles through enough copies of the cache (>= 512
MB in all, like the layers of a model) that the K/V reads come from HBM, not from L2.
Bandwidth = bytes of valid K/V read (b * kv_heads * valid slots * d * 2 tensors * 2 bytes) over
the time; roofline = those bytes over the H200's 4.08 TB/s. The SDPA path's "bandwidth" uses the
same bytes (the work needed), so the two columns compare directly. Each case also records the
largest difference between the two outputs. A failing case is recorded with its error.
Writes OUT_DIR/bench_attention.json and OUT_DIR/bench_attention.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HBM_BYTES_PER_S = 4.08e12  # H200 HBM3e peak
ROTATION_BYTES = 512 * 2**20  # caches cycled through per timed graph: several times the L2
MAX_COPIES = 64


def _int_list(spec: str) -> list[int]:
    try:
        return [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {spec!r}") from None


def _float_list(spec: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {spec!r}") from None
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fill fractions must lie in (0, 1], got {spec!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench_attention.json and .md")
    p.add_argument("--batch", type=_int_list, default=[1, 16, 64])
    p.add_argument("--context", type=_int_list, default=[1024, 8192, 32768], help="cache slots per row")
    p.add_argument("--tokens", type=_int_list, default=[1, 5], help="new tokens per row (1: decode)")
    p.add_argument("--fill", type=_float_list, default=[1.0], help="fraction of the slots in use (default 1.0)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rep", type=int, default=50, help="target ms of timed repetitions per case")
    return p


def sdpa_with_mask(query, keys, values, mask, scale):
    """The engine's current path (generate/engine.py grouped_query_attention at the time of
    writing): a group's query heads laid along the query axis, the (b, 1, t, S) mask expanded
    to them, F.scaled_dot_product_attention over every slot."""
    import torch.nn.functional as F

    b, h, t, d = query.shape
    kv_heads, s = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    query = query.reshape(b, kv_heads, group * t, d)
    mask = mask[:, :, None].expand(b, 1, group, t, s).reshape(b, 1, group * t, s)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


def bench_case(torch, bench_graph, args, b: int, S: int, t: int, fill: float) -> list[dict]:
    from mambaify.ops.attention import attention_mask_from_slots, decode_attention
    from mambaify.ops.triton import decode_attention as kernels

    h, kv, d = args.heads, args.kv_heads, args.head_dim
    dtype, dev = torch.bfloat16, "cuda"
    valid = max(t, int(round(fill * S)))
    shape = {"batch": b, "context": S, "tokens": t, "valid_slots": valid}
    kv_bytes = b * kv * valid * d * 2 * 2
    per_copy = 2 * b * kv * S * d * 2
    copies = max(1, min(MAX_COPIES, math.ceil(ROTATION_BYTES / per_copy)))

    g = torch.Generator(device=dev).manual_seed(0)
    caches = [
        (torch.randn(b, kv, S, d, device=dev, dtype=dtype, generator=g),
         torch.randn(b, kv, S, d, device=dev, dtype=dtype, generator=g))
        for _ in range(copies)
    ]
    query = torch.randn(b, h, t, d, device=dev, dtype=dtype, generator=g)
    kv_start = torch.zeros(b, dtype=torch.long, device=dev)
    query_slots = (valid - t + torch.arange(t, device=dev)).expand(b, t).contiguous()
    mask = attention_mask_from_slots(kv_start, query_slots, S)
    out = torch.empty_like(query)
    scale = d**-0.5

    def rotating(fn):
        turn = [0]

        def call():
            keys, values = caches[turn[0] % copies]
            turn[0] += 1
            return fn(keys, values)
        return call

    ours = rotating(lambda k, v: decode_attention(query, k, v, kv_start, query_slots, scale, out=out, check_values=False))
    sdpa = rotating(lambda k, v: sdpa_with_mask(query, k, v, mask, scale))
    try:
        ours_out = decode_attention(query, *caches[0], kv_start, query_slots, scale)
        max_diff = (ours_out.float() - sdpa_with_mask(query, *caches[0], mask, scale).float()).abs().max().item()
    except Exception as err:  # recorded below, where timing the failing path fails too
        print(f"comparing the outputs failed: {err}", file=sys.stderr)
        max_diff = None
    splits = kernels.plan_launch(b, h, kv, t, S, d, query.device).splits

    rows = []
    for impl, fn in (("ours (flash-decoding)", ours), ("SDPA + mask (engine)", sdpa)):
        row = {**shape, "impl": impl, "copies": copies}
        if impl.startswith("ours"):
            row["splits"] = splits
        try:
            ms = bench_graph(fn)
            row.update(
                ms=ms,
                GB_per_s=kv_bytes / (ms * 1e-3) / 1e9,
                roofline_ms=kv_bytes / HBM_BYTES_PER_S * 1e3,
                pct_of_roofline=100 * kv_bytes / (ms * 1e-3) / HBM_BYTES_PER_S,
                max_abs_diff_vs_other=max_diff,
            )
        except Exception as err:  # a failing case is a result too (out of memory, say); keep going
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)
    caches.clear()  # the copies go before the next shape's are made
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Decode / verify attention: flash-decoding kernel vs SDPA with a mask",
        "",
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['started']}. "
        f"Shape: {meta['heads']} query heads, {meta['kv_heads']} kv heads, head dim {meta['head_dim']}, bf16; "
        "times are medians per call inside CUDA graphs; bandwidth = valid K/V bytes / time, "
        f"against {HBM_BYTES_PER_S / 1e12:.2f} TB/s.",
        "",
        "| batch | context | t | valid slots | impl | splits | ms | GB/s | % of roofline | speed-up | max abs diff |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["batch"], r["context"], r["tokens"], r["valid_slots"]), {})[r["impl"]] = r
    for (b, S, t, valid), impls in by_case.items():
        ms_sdpa = impls.get("SDPA + mask (engine)", {}).get("ms")
        for impl, r in impls.items():
            if "error" in r:
                lines.append(f"| {b} | {S} | {t} | {valid} | {impl} | | error: {r['error']} | | | | |")
                continue
            speedup = f"{ms_sdpa / r['ms']:.2f}x" if ms_sdpa and impl.startswith("ours") else ""
            diff = r["max_abs_diff_vs_other"]
            lines.append(
                f"| {b} | {S} | {t} | {valid} | {impl} | {r.get('splits', '')} | {r['ms']:.4f} | "
                f"{r['GB_per_s']:.0f} | {r['pct_of_roofline']:.1f} | {speedup} | "
                f"{'n/a' if diff is None else f'{diff:.2e}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print(f"bench_attention: --heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench_cudagraph

    def bench_graph(fn):
        fn()  # compile, allocate the workspace, outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=args.rep, return_mode="median")

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hbm_peak_bytes_per_s": HBM_BYTES_PER_S,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    for b in args.batch:
        for S in args.context:
            for t in args.tokens:
                for fill in args.fill:
                    rows += bench_case(torch, bench_graph, args, b, S, t, fill)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_attention.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    text = markdown(rows, meta)
    (args.out / "bench_attention.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
