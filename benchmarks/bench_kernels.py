"""Time the SSD scan backends and the decode kernels on a GPU; write JSON and a markdown table.

Usage (on the H200, after ``source benchmarks/h200/env.sh``):

    python3 benchmarks/bench_kernels.py OUT_DIR [--prefill b8,t2048,h32,p64,n64 ...]
        [--decode b1,h32,p128,n128 ...] [--only scan|decode|verify] [--no-compile]
        [--verify-batch 1,8] [--verify-k 2,3,4,5,6,7,8] [--gemv-batch 1,8]

Prefill/training: the reference chunked scan (eager and torch.compile'd) against fla's
chunk_simple_gla and chunk_gla, forward and forward+backward, in bf16 (decays and states fp32).
Decode (one token, an 8B-shaped model by default: 32 heads of 128, d_state 128, conv width
6144, norm width 4096): our Triton kernels against the PyTorch path, timed both as launched from
Python and replayed in a CUDA graph (how the generation engine runs them); the SSD step is
memory-bound, so its achieved bandwidth is reported against the H200's 4.08 TB/s.
Verify (speculative decoding, one 8B-shaped Mamba layer, batch 1 and 8, K = 2..8 drafts): one
fused verify call over K + 1 tokens (replay of the K + 1 accepted cached tokens, the replay's
worst case, then K + 1 new tokens, no per-token state stored), the naive variant that stores
every per-token state, and K + 1 single-token ssd_step_inplace calls, each in a CUDA graph; the
conv window likewise. "cost in steps" = a call's time over one plain decode step's.
GEMV (``--only gemv``; not in the default run): the linear layers of the 8B decode step at batch
1 and 8 (each of Llama-3-8B's and its Mamba2 layer's matrices, q/k/v and gate/up also as one
matrix each, the LM head): cuBLAS (F.linear), inductor's max-autotune choice (torch.compile of
F.linear, skipped with --no-compile) and mambaify's split-K Triton kernel (the best of a few block
sizes, with its planned splits and with none, named in the row; for gate_proj also gate and up
read in one pass with the SiLU gate applied, small_batch_gated_up), in CUDA graphs, each call on
another copy of the weight (together beyond the 60 MB L2, as a model's layers are); "TB/s" is
the bytes of the matrices read over the time. GEMV with fused operands (``--only gemv-fused``):
the matrices that the engines' fold_norms gives an RMSNorm, Mamba2's gated norm or the residual
add, folded into the split-K GEMV against the norm and add as kernels of their own, at a few
launch configurations (``--gemv-configs``), and at one row at the engine's configuration with the
loop pipelined (3 and 4 stages) and with int8 matrices (an int8 draft's; "TB/s" then counts one
byte a weight), at the engine's K blocks and at twice as many columns (the same bytes a tile). GEMV chain (``--only gemv-chain``): the 8B 0% hybrid's GEMVs as
its step calls them, several layers back to back in one graph, launched one after another (the
one-row loops as by default, then pipelined: MAMBAIFY_GEMV_STAGES=3, 4) and as programmatic
dependent launches (MAMBAIFY_PDL=1).

Times are medians of triton.testing.do_bench / do_bench_cudagraph, in milliseconds. A case
that fails (compile error, out of memory, a kernel refusing the machine) is recorded with its
error and the run goes on. Writes OUT_DIR/bench_kernels.json and OUT_DIR/bench_kernels.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HBM_BYTES_PER_S = 4.08e12  # H200 HBM3e peak
DEVICE = "cuda"
DEFAULT_PREFILL = ["b8,t2048,h32,p64,n64", "b2,t4096,h32,p128,n128"]
DEFAULT_DECODE = ["b1,h32,p128,n128", "b64,h32,p128,n128"]
# The 8B-shaped Mamba layer the conversion makes from Llama-3-8B: 32 heads of 128, d_state 128,
# x and B from 8 kv heads (conv width 8 * (128 + 128) + 32 * 128 = 6144), d_conv 4.
VERIFY_SHAPE = {"h": 32, "p": 128, "n": 128}


def parse_shape(spec: str, keys: str) -> dict[str, int]:
    """'b8,t2048,h32,p64,n64' -> {'b': 8, 't': 2048, ...}; every key in ``keys`` must be given."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part or not part[0].isalpha() or not part[1:].isdigit():
            raise argparse.ArgumentTypeError(f"bad shape element {part!r} in {spec!r}")
        out[part[0]] = int(part[1:])
    if set(out) != set(keys):
        raise argparse.ArgumentTypeError(f"shape {spec!r} needs exactly the keys {', '.join(keys)}")
    return out


def _int_list(spec: str) -> list[int]:
    try:
        return [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {spec!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for bench_kernels.json and bench_kernels.md")
    p.add_argument("--prefill", action="append", type=lambda s: parse_shape(s, "bthpn"),
                   help=f"scan shape b,t,h,p,n (repeatable; default {' and '.join(DEFAULT_PREFILL)})")
    p.add_argument("--decode", action="append", type=lambda s: parse_shape(s, "bhpn"),
                   help=f"decode shape b,h,p,n (repeatable; default {' and '.join(DEFAULT_DECODE)})")
    p.add_argument("--kv-heads", type=int, default=8, help="x/B heads for the conv width (default 8)")
    p.add_argument("--d-conv", type=int, default=4)
    p.add_argument("--only", choices=["scan", "decode", "verify", "gemv", "gemv-fused", "gemv-chain"],
                   help="run one group only (the gemv groups run only when asked for)")
    p.add_argument("--gemv-batch", type=_int_list, default=[1, 8], help="GEMV rows (default 1,8)")
    p.add_argument("--gemv-configs", type=_gemv_configs, default=None,
                   help="GEMV block sizes to try, BN,BK,WARPS;... (default: 12 of them, BN 16/32/64, "
                        "BK 256/512, 4/8 warps)")
    p.add_argument("--verify-batch", type=_int_list, default=[1, 8], help="verify batch sizes (default 1,8)")
    p.add_argument("--verify-k", type=_int_list, default=list(range(2, 9)), help="draft lengths K (default 2..8)")
    p.add_argument("--verify-shape", type=_int_list, default=[VERIFY_SHAPE[c] for c in "hpn"],
                   help="the verified Mamba layer's heads, head dim and state size h,p,n (default 32,128,128, "
                        "the 8B shape; SmolLM2's 50%% hybrid: 9,64,64)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    p.add_argument("--rep", type=int, default=100, help="target ms of timed repetitions per case")
    return p


# --------------------------------------------------------------------------- helpers


def _gemv_configs(text: str) -> list[tuple[int, int, int]]:
    try:
        configs = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part]
    except ValueError:
        configs = []
    if not configs or any(len(c) != 3 for c in configs):
        raise argparse.ArgumentTypeError(f"--gemv-configs {text!r}: expected BN,BK,WARPS;... e.g. 32,256,4;64,256,4")
    return configs


class Recorder:
    def __init__(self):
        self.rows: list[dict] = []

    def run(self, group: str, shape: str, impl: str, time_fn: Callable[[], float], **extra_of_ms) -> None:
        """Time one case; ``extra_of_ms`` maps a column name to a function of the median ms."""
        row = {"group": group, "shape": shape, "impl": impl}
        try:
            ms = time_fn()
            row["ms"] = ms
            for name, f in extra_of_ms.items():
                row[name] = f(ms)
        except Exception as err:  # a failing case is a result too; keep going
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)


def fmt_shape(d: dict[str, int]) -> str:
    return " ".join(f"{k}{v}" for k, v in d.items())


# --------------------------------------------------------------------------- scan


def bench_scan(rec: Recorder, shape: dict[str, int], args, torch, bench) -> None:
    from mambaify import ops

    b, t, h, p, n = (shape[k] for k in "bthpn")
    name = fmt_shape(shape)
    dev, bf16 = DEVICE, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(b, t, h, p, device=dev, dtype=bf16)
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, device=dev) - 1).to(bf16)
    A = -torch.rand(h, device=dev) * 2 - 0.1
    B = (torch.randn(b, t, h, n, device=dev) * n**-0.5).to(bf16)
    C = (torch.randn(b, t, h, n, device=dev) * n**-0.5).to(bf16)
    D = torch.randn(h, device=dev)
    S0 = torch.randn(b, h, n, p, device=dev)
    leaves = [x, dt, A, B, C, D, S0]
    tok_s = {"tokens_per_s": lambda ms: b * t / (ms * 1e-3)}

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, dt, A, B, C, D, S0)
        return run

    def fwd_bwd(fn):
        req = [v.detach().requires_grad_(True) for v in leaves]

        def run():
            y, s = fn(*req)
            torch.autograd.grad(y.float().sum() + s.float().sum(), req)
        return run

    eager = ops.ssd_chunked
    rec.run("scan", name, "reference chunked eager, fwd", lambda: bench(fwd(eager)), **tok_s)
    rec.run("scan", name, "reference chunked eager, fwd+bwd", lambda: bench(fwd_bwd(eager)), **tok_s)
    if not args.no_compile:
        compiled = torch.compile(ops.ssd_chunked, dynamic=False)
        rec.run("scan", name, "reference chunked compiled, fwd", lambda: bench(fwd(compiled)), **tok_s)
        rec.run("scan", name, "reference chunked compiled, fwd+bwd", lambda: bench(fwd_bwd(compiled)), **tok_s)

    try:
        from mambaify.ops.triton import fla_scan as fs
    except Exception as err:
        rec.rows.append({"group": "scan", "shape": name, "impl": "fla", "error": f"fla unavailable: {err}"})
        return
    simple = lambda *a: fs.fla_scan(*a, kernel="simple_gla")  # noqa: E731
    gla = lambda *a: fs.fla_scan(*a, kernel="gla")  # noqa: E731
    rec.run("scan", name, "fla chunk_simple_gla, fwd", lambda: bench(fwd(simple)), **tok_s)
    if fs.simple_gla_backward_ok(torch.cuda.current_device()):
        rec.run("scan", name, "fla chunk_simple_gla, fwd+bwd", lambda: bench(fwd_bwd(simple)), **tok_s)
    rec.run("scan", name, "fla chunk_gla, fwd", lambda: bench(fwd(gla)), **tok_s)
    rec.run("scan", name, "fla chunk_gla, fwd+bwd", lambda: bench(fwd_bwd(gla)), **tok_s)
    # What ops.ssd_scan picks for packed rows (varlen path, one host sync for the cuts).
    reset = torch.zeros(b, t, dtype=torch.bool, device=dev)
    reset[:, :: max(t // 4, 1)] = True
    packed = lambda *a: fs.fla_scan(*a[:7], reset=reset)  # noqa: E731
    rec.run("scan", name, "fla auto, 4 documents per row, fwd+bwd", lambda: bench(fwd_bwd(packed)), **tok_s)


# --------------------------------------------------------------------------- decode


def bench_decode(rec: Recorder, shape: dict[str, int], args, torch, bench, bench_graph) -> None:
    from mambaify import ops
    from mambaify.ops import triton as kernels

    b, h, p, n = (shape[k] for k in "bhpn")
    name = fmt_shape(shape)
    dev, bf16 = DEVICE, torch.bfloat16
    torch.manual_seed(0)
    state = torch.randn(b, h, n, p, device=dev)
    x = torch.randn(b, h, p, device=dev, dtype=bf16)
    dt = torch.nn.functional.softplus(torch.randn(b, h, device=dev)).to(bf16)
    A = -torch.rand(h, device=dev) - 0.1
    B = torch.randn(b, h, n, device=dev, dtype=bf16)
    C = torch.randn(b, h, n, device=dev, dtype=bf16)
    D = torch.randn(h, device=dev)
    y = torch.empty_like(x)
    # Bytes a step must move: the fp32 state read and written, plus its inputs and output.
    step_bytes = 2 * state.numel() * 4 + (x.numel() + B.numel() + C.numel() + dt.numel() + y.numel()) * 2
    bw = {
        "GB_per_s": lambda ms: step_bytes / (ms * 1e-3) / 1e9,
        "pct_of_hbm_peak": lambda ms: 100 * step_bytes / (ms * 1e-3) / HBM_BYTES_PER_S,
    }

    def torch_step():
        y_ref, new_state = ops.ssd_step(state, x, dt, A, B, C, D)
        state.copy_(new_state)
        y.copy_(y_ref)

    kernel_step = lambda: kernels.ssd_step_inplace(state, x, dt, A, B, C, D, out=y)  # noqa: E731
    for impl, fn in [("triton ssd_step_inplace", kernel_step), ("torch ssd_step + copy_", torch_step)]:
        rec.run("decode ssd step", name, f"{impl}, launched", lambda: bench(fn), **bw)
        rec.run("decode ssd step", name, f"{impl}, CUDA graph", lambda: bench_graph(fn), **bw)
    if not args.no_compile:
        compiled = torch.compile(torch_step, dynamic=False)
        rec.run("decode ssd step", name, "torch compiled, CUDA graph", lambda: bench_graph(compiled), **bw)

    # Conv window of the mixer (x, B from the kv heads, C from all heads) and the gated norm.
    d = args.kv_heads * (p + n) + h * n
    K = args.d_conv
    conv_state = torch.randn(b, d, K - 1, device=dev, dtype=bf16)
    xc = torch.randn(b, d, device=dev, dtype=bf16)
    w = torch.randn(d, K, device=dev, dtype=bf16)
    bias = torch.randn(d, device=dev, dtype=bf16)
    yc = torch.empty_like(xc)
    conv_name = f"b{b} d{d} K{K}"

    def torch_conv():
        out, new_state = ops.causal_conv1d(xc[:, None], w, bias, conv_state)
        conv_state.copy_(new_state)
        yc.copy_(torch.nn.functional.silu(out[:, 0]))

    kernel_conv = lambda: kernels.conv_step_inplace(conv_state, xc, w, bias, True, out=yc)  # noqa: E731
    for impl, fn in [("triton conv_step_inplace", kernel_conv), ("torch causal_conv1d + silu", torch_conv)]:
        rec.run("decode conv step", conv_name, f"{impl}, CUDA graph", lambda: bench_graph(fn))

    width = h * p
    yn = torch.randn(b, width, device=dev, dtype=bf16)
    zn = torch.randn(b, width, device=dev, dtype=bf16)
    wn = torch.randn(width, device=dev)
    norm_name = f"rows{b} N{width}"
    for impl, fn in [
        ("triton gated_rmsnorm", lambda: kernels.gated_rmsnorm(yn, zn, wn, 1e-5)),
        ("torch (GatedRMSNorm's ops)", lambda: _torch_norm(torch, yn, zn, wn)),
    ]:
        rec.run("decode gated norm", norm_name, f"{impl}, CUDA graph", lambda: bench_graph(fn))


def _torch_norm(torch, y, z, w, eps=1e-5):
    # The module's forward (ops.gated_rmsnorm would dispatch CUDA tensors to the kernel).
    h = y.float() * torch.nn.functional.silu(z.float())
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(y.dtype)


def bench_norm_training(rec: Recorder, shape: dict[str, int], torch, bench) -> None:
    from mambaify.ops import triton as kernels

    rows, width = shape["b"] * shape["t"], shape["h"] * shape["p"]
    y = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(width, device=DEVICE, requires_grad=True)
    g = torch.randn(rows, width, device=DEVICE)

    def run(fn):
        return lambda: torch.autograd.grad(fn(y, z, w), (y, z, w), g)

    name = f"rows{rows} N{width}"
    rec.run("gated norm fwd+bwd", name, "triton gated_rmsnorm", lambda: bench(run(lambda *a: kernels.gated_rmsnorm(*a, 1e-5))))
    rec.run("gated norm fwd+bwd", name, "torch (GatedRMSNorm's ops)", lambda: bench(run(lambda *a: _torch_norm(torch, *a))))


# --------------------------------------------------------------------------- verify


def bench_verify(rec: Recorder, b: int, k: int, args, torch, bench_graph) -> None:
    """One 8B-shaped Mamba layer's verify call over t = K + 1 tokens: fused vs naive vs t steps."""
    from mambaify.ops import triton as kernels

    if len(args.verify_shape) != 3:
        raise SystemExit(f"--verify-shape takes h,p,n, got {args.verify_shape}")
    h, p, n = args.verify_shape
    t = T = k + 1
    dev, bf16 = DEVICE, torch.bfloat16
    name = f"b{b} K{k} h{h} p{p} n{n}"
    torch.manual_seed(0)
    x = torch.randn(b, t, h, p, device=dev, dtype=bf16)
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, device=dev) - 1).to(bf16)
    A = -torch.rand(h, device=dev) - 0.1
    B = (torch.randn(b, t, h, n, device=dev) * n**-0.5).to(bf16)
    C = (torch.randn(b, t, h, n, device=dev) * n**-0.5).to(bf16)
    D = torch.randn(h, device=dev)
    y = torch.empty_like(x)
    checkpoint = torch.randn(b, h, n, p, device=dev)
    x_cache, dt_cache, B_cache = x.clone(), dt.clone(), B.clone()
    states = torch.randn(b, T, h, n, p, device=dev)
    counts = torch.full((b,), t, device=dev, dtype=torch.int32)  # every cached token replayed

    state_bytes = checkpoint.numel() * 4
    token_inputs = (x.numel() + dt.numel() + B.numel()) * 2  # what the caches hold, per call
    io_bytes = token_inputs + (C.numel() + y.numel()) * 2
    traffic = {
        # checkpoint read + written, the cached inputs replayed and rewritten, the call's own I/O
        "fused": 2 * state_bytes + 2 * token_inputs + io_bytes,
        # the accepted state gathered, saved as the checkpoint, t states written, the call's I/O
        "naive": (2 + t) * state_bytes + io_bytes,
        "steps": t * 2 * state_bytes + io_bytes,
    }

    def bandwidth(kind):
        return {
            "GB_per_s": lambda ms: traffic[kind] / (ms * 1e-3) / 1e9,
            "pct_of_hbm_peak": lambda ms: 100 * traffic[kind] / (ms * 1e-3) / HBM_BYTES_PER_S,
        }

    def steps():
        for i in range(t):
            kernels.ssd_step_inplace(checkpoint, x[:, i], dt[:, i], A, B[:, i], C[:, i], D, out=y[:, i])

    def fused(prefetch=None):
        kernels.ssd_verify_inplace(checkpoint, x_cache, dt_cache, B_cache, counts, x, dt, A, B, C, D, out=y,
                                   prefetch=prefetch)

    def naive():
        kernels.ssd_verify_store_states(checkpoint, states, counts, x, dt, A, B, C, D, out=y)

    step_ms: list[float] = []

    def timed_steps():
        ms = bench_graph(steps)
        step_ms.append(ms / t)
        return ms

    rec.run("verify ssd", name, f"{t} x ssd_step_inplace, CUDA graph", timed_steps, **bandwidth("steps"))
    per_step = {"cost_in_steps": lambda ms: ms / step_ms[0]} if step_ms else {}
    rec.run("verify ssd", name, "fused ssd_verify_inplace, CUDA graph", lambda: bench_graph(fused),
            **bandwidth("fused"), **per_step)
    # The kernel's two load forms forced (the default above picks one by the tiles' size).
    rec.run("verify ssd", name, "fused ssd_verify_inplace, prefetched, CUDA graph",
            lambda: bench_graph(lambda: fused(prefetch=True)), **bandwidth("fused"), **per_step)
    rec.run("verify ssd", name, "fused ssd_verify_inplace, per-step loads, CUDA graph",
            lambda: bench_graph(lambda: fused(prefetch=False)), **bandwidth("fused"), **per_step)
    rec.run("verify ssd", name, "naive ssd_verify_store_states, CUDA graph", lambda: bench_graph(naive),
            **bandwidth("naive"), **per_step)

    # The conv window of the same layer.
    c = args.kv_heads * (p + n) + h * n
    K = args.d_conv
    window = torch.randn(b, K - 1 + T, c, device=dev, dtype=bf16)
    conv_state = torch.randn(b, c, K - 1, device=dev, dtype=bf16)
    xBC = torch.randn(b, t, c, device=dev, dtype=bf16)
    w = torch.randn(c, K, device=dev, dtype=bf16)
    bias = torch.randn(c, device=dev, dtype=bf16)
    yc = torch.empty_like(xBC)
    conv_name = f"b{b} K{k} d{c} d_conv{K}"

    def conv_steps():
        for i in range(t):
            kernels.conv_step_inplace(conv_state, xBC[:, i], w, bias, True, out=yc[:, i])

    conv_step_ms: list[float] = []

    def timed_conv_steps():
        ms = bench_graph(conv_steps)
        conv_step_ms.append(ms / t)
        return ms

    rec.run("verify conv", conv_name, f"{t} x conv_step_inplace (silu), CUDA graph", timed_conv_steps)
    per_conv_step = {"cost_in_steps": lambda ms: ms / conv_step_ms[0]} if conv_step_ms else {}
    rec.run("verify conv", conv_name, "conv_verify_inplace (silu), CUDA graph",
            lambda: bench_graph(lambda: kernels.conv_verify_inplace(window, counts, xBC, w, bias, out=yc, silu=True)),
            **per_conv_step)


# --------------------------------------------------------------------------- gemv

# (name, N, K): the 8B decode step's matrices, out_features x in_features.
GEMV_SHAPES = [
    ("q_proj / o_proj / out_proj", 4096, 4096),
    ("k_proj / v_proj", 1024, 4096),
    ("q+k+v as one", 6144, 4096),
    ("mamba in_proj (z, x, B, C, dt)", 8480, 4096),
    ("gate_proj / up_proj", 14336, 4096),
    ("gate+up as one", 28672, 4096),
    ("down_proj", 4096, 14336),
    ("lm_head", 128256, 4096),
]
GEMV_CONFIGS = [(bn, bk, w) for bn in (16, 32, 64) for bk in (256, 512) for w in (4, 8)]
L2_BEATING_BYTES = 512 * 2**20


def refused_or(name: str, fn: Callable):
    """``fn()``, or None where the GPU refuses the launch configuration (registers, shared
    memory), said on stdout."""
    try:
        return fn()
    except Exception as e:  # a config the machine refuses
        print(f"{name}: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        return None


def check_close(name: str, got, expected, tol: float) -> None:
    """An AssertionError where ``got`` is off ``expected`` by a relative error of ``tol`` or more."""
    err = ((got.float() - expected).norm() / expected.norm()).item()
    if not err < tol:
        raise AssertionError(f"{name}: rel. error {err:.2e}")


def bench_gemv(rec: Recorder, m: int, args, torch, bench_graph) -> None:
    from mambaify.ops.triton.gemv import plan, small_batch_gated_up, small_batch_linear

    F, bf16 = torch.nn.functional, torch.bfloat16
    for name, n, k in GEMV_SHAPES:
        gated = name.startswith("gate_proj")  # also time gate and up read together (small_batch_gated_up)
        weight_bytes = n * k * 2
        copies = max(1, -(-L2_BEATING_BYTES // weight_bytes))
        torch.manual_seed(0)
        weights = [torch.randn(n, k, device=DEVICE, dtype=bf16) * k ** -0.5 for _ in range(copies)]
        x = torch.randn(m, k, device=DEVICE, dtype=bf16)
        shape = f"m{m} n{n} k{k} ({name})"

        def timed(linear, weights=weights):
            def run():
                for i, w in enumerate(weights):
                    linear(x, w, weights[i - 1])  # the gated kernel reads a second matrix
            return lambda: bench_graph(run) / copies

        def tbs(per_call_bytes):
            return {"TB_per_s": lambda ms: per_call_bytes / (ms * 1e-3) / 1e12}

        rec.run("gemv", shape, "cuBLAS (F.linear)", timed(lambda x_, w_, _: F.linear(x_, w_)),
                **tbs(weight_bytes))
        if not args.no_compile:
            compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
            rec.run("gemv", shape, "inductor max-autotune", timed(lambda x_, w_, _: compiled(x_, w_)),
                    **tbs(weight_bytes))
        kinds = [("split-K", weight_bytes, lambda x_, w_, u_, **kw: small_batch_linear(x_, w_, **kw),
                  lambda w_, u_: F.linear(x.float(), w_.float()))]
        if gated:
            kinds.append(("gate+up fused (SwiGLU)", 2 * weight_bytes, small_batch_gated_up,
                          lambda w_, u_: F.silu(F.linear(x.float(), w_.float())) * F.linear(x.float(), u_.float())))
        for label, nbytes, kernel, reference in kinds:
            expected = reference(weights[0], weights[-1])
            best = {}  # per variant (planned splits in one launch or two, no split): (ms, config)
            for bn, bk, warps in args.gemv_configs or GEMV_CONFIGS:
                # The planned split-K (its sums added in the same launch, or by a second kernel),
                # and none (no partial sums to add) where the plan splits.
                planned = plan(n, k, torch.device(DEVICE), bn, bk, dot=m > 1)[1]
                variants = [(None, True), (None, False), (1, True)] if planned > 1 else [(None, True)]
                for splits, one_launch in variants:
                    def ours(x_, w_, u_, bn=bn, bk=bk, warps=warps, splits=splits, one_launch=one_launch):
                        return kernel(x_, w_, u_, block_n=bn, block_k=bk, num_warps=warps, splits=splits,
                                      one_launch=one_launch)
                    name = f"gemv {label} {shape} bn{bn} bk{bk} w{warps}"
                    result = refused_or(name, lambda: (ours(x, weights[0], weights[-1]), timed(ours)()))
                    if result is None:
                        continue
                    got, ms = result
                    check_close(name, got, expected, 1e-2)
                    how = "no split" if splits == 1 else "planned splits, " + ("1 launch" if one_launch else "2 launches")
                    if how not in best or ms < best[how][0]:
                        best[how] = (ms, f"bn{bn} bk{bk} w{warps}")
            for how, (ms, config) in best.items():
                rec.run("gemv", shape, f"mambaify {label} ({how}; best {config})", lambda ms=ms: ms, **tbs(nbytes))
        weights.clear()  # the copies go before the next shape's are made
        torch.cuda.empty_cache()
    bench_grouped_qkv(rec, m, torch, bench_graph)


def bench_grouped_qkv(rec: Recorder, m: int, torch, bench_graph) -> None:
    """An 8B attention layer's q, k and v (4096, 1024 and 1024 rows of 4096): three split-K
    launches against one grouped launch (ops.small_batch_qkv), each at the default configuration
    and tuned, over weight copies beyond the L2."""
    from mambaify.ops.triton import gemv

    bf16, k = torch.bfloat16, 4096
    sizes = (4096, 1024, 1024)
    nbytes = sum(sizes) * k * 2
    copies = max(1, -(-L2_BEATING_BYTES // nbytes))
    torch.manual_seed(0)
    groups = [[torch.randn(n, k, device=DEVICE, dtype=bf16) * k ** -0.5 for n in sizes] for _ in range(copies)]
    x = torch.randn(m, k, device=DEVICE, dtype=bf16)
    shape = f"m{m} q4096 k1024 v1024 k{k}"
    expected = torch.cat([x.float() @ w.float().t() for w in groups[0]], -1)
    check_close(f"grouped q, k, v {shape}", gemv.small_batch_qkv(x, *groups[0]), expected, 1e-2)

    def timed(call):
        def run():
            for mats in groups:
                call(mats)
        return lambda: bench_graph(run) / copies

    tbs = {"TB_per_s": lambda ms: nbytes / (ms * 1e-3) / 1e12}
    rec.run("gemv", shape, "mambaify split-K, three launches (default config)",
            timed(lambda mats: [gemv.small_batch_linear(x, w) for w in mats]), **tbs)
    rec.run("gemv", shape, "mambaify split-K, q+k+v in one launch (default config)",
            timed(lambda mats: gemv.small_batch_qkv(x, *mats)), **tbs)
    # The configuration MAMBAIFY_GEMV_TUNE=1 would pick for this call, timed here once.
    tuned = dict(zip(("block_n", "block_k", "num_warps"), gemv._tuned(x, tuple(groups[0]), None, None, None, None)))
    rec.run("gemv", shape, f"mambaify split-K, q+k+v in one launch (tuned: {tuned})",
            timed(lambda mats: gemv.small_batch_qkv(x, *mats, **tuned)), **tbs)
    groups.clear()
    torch.cuda.empty_cache()


# (name, N, K, fused operands): the 8B step's matrices that fold_norms gives a norm ("norm"),
# Mamba2's gated norm ("gate") or the residual add ("residual").
# "gate+up": the engine's call, gate and up (14336 x 4096 each) read together with SiLU applied
# (small_batch_gated_up); "gate+up as one": the two as one 28672-row matrix (no SiLU).
FUSED_GEMV_SHAPES = [
    ("q+k+v as one", 6144, 4096, "norm"),
    ("mamba in_proj", 8480, 4096, "norm"),
    ("gate+up", 14336, 4096, "norm,swiglu"),
    ("gate+up as one", 28672, 4096, "norm"),
    ("o_proj", 4096, 4096, "residual"),
    ("down_proj", 4096, 14336, "residual"),
    ("mamba out_proj", 4096, 4096, "gate,residual"),
    ("lm_head", 128256, 4096, "norm"),
]
FUSED_GEMV_CONFIGS = [(32, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8)]
# One row, folded, at the engine's configuration: the loop pipelined over these stages as well
# (MAMBAIFY_GEMV_STAGES; 1 is the loop as it runs by default).
FUSED_GEMV_STAGES = (3, 4)


def bench_gemv_fused(rec: Recorder, m: int, args, torch, bench_graph) -> None:
    """The split-K GEMV with fold_norms' fused operands against the same GEMV after the norm or
    before the residual add as their own kernels (inductor's, as the compiled step runs them),
    each at a few launch configurations, over weight copies beyond the L2. Time per call,
    normalization included; at several rows (a verify call) every n block's programs redo the
    norm's work on x, which this measures."""
    from mambaify.generate.quantize import quantize_rows
    from mambaify.ops import reference
    from mambaify.ops.triton.gemv import (
        default_config, small_batch_gated_up, small_batch_linear, small_batch_linear_prepare_norm,
    )

    bf16 = torch.bfloat16
    norm = torch.compile(reference.rms_norm, dynamic=False)
    gated_norm = torch.compile(reference.gated_rms_norm, dynamic=False)
    add = torch.compile(torch.add, dynamic=False)
    for name, n, k, fused in FUSED_GEMV_SHAPES:
        swiglu = "swiglu" in fused
        matrices = 2 if swiglu else 1
        copies = max(1, -(-L2_BEATING_BYTES // (matrices * n * k * 2)))
        torch.manual_seed(0)
        weights = [tuple(torch.randn(n, k, device=DEVICE, dtype=bf16) * k ** -0.5 for _ in range(matrices))
                   for _ in range(copies)]
        x = torch.randn(m, k, device=DEVICE, dtype=bf16)
        g = 1 + 0.1 * torch.randn(k, device=DEVICE, dtype=bf16)
        z = torch.randn(m, k, device=DEVICE, dtype=bf16) if "gate" in fused.split(",") else None
        res = torch.randn(m, n, device=DEVICE, dtype=bf16) if "residual" in fused else None
        norm_weight = g if "norm" in fused or z is not None else None
        shape = f"m{m} n{n} k{k} ({name}: {fused})"

        def unfused(w, **config):
            rows = x
            if z is not None:
                rows = gated_norm(x, z, g, 1e-5)
            elif norm_weight is not None:
                rows = norm(x, g, 1e-5)
            out = small_batch_gated_up(rows, *w, **config) if swiglu else small_batch_linear(rows, w[0], **config)
            return add(out, res) if res is not None else out

        def folded(w, **config):
            if swiglu:
                return small_batch_gated_up(x, *w, norm_weight=norm_weight, norm_eps=1e-5, **config)
            return small_batch_linear(x, w[0], norm_weight=norm_weight, norm_eps=1e-5, residual=res, gate=z, **config)

        # A prepared norm (MAMBAIFY_PREPARED_NORMS=1, several rows): a residual add's GEMV also
        # prepares the next norm (x * g and its rows' sums of squares, for a stream as wide as
        # its output); a norm's GEMV reads them, x * g and the sums of 128 blocks of columns.
        next_g = 1 + 0.1 * torch.randn(n, device=DEVICE, dtype=bf16)
        scaled_x = (x.float() * g.float()).to(bf16)
        parts = x.float().pow(2).reshape(m, 128, -1).sum(-1).T.contiguous()

        def prepared(w):
            if res is not None:  # Mamba's out_proj: its gated norm still a kernel of its own
                rows = gated_norm(x, z, g, 1e-5) if z is not None else x
                return small_batch_linear_prepare_norm(rows, w[0], None, res, next_g)[0]
            if swiglu:
                return small_batch_gated_up(scaled_x, *w, norm_parts=parts, norm_eps=1e-5)
            return small_batch_linear(scaled_x, w[0], norm_parts=parts, norm_eps=1e-5)

        # An int8 draft's matrices (--draft-int8): the same, each row rounded to its own scale;
        # checked against the folded GEMV over the dequantized bf16 matrices.
        def folded_int8(w, **config):
            (wq, sq), (uq, su) = w[0], w[-1]
            if swiglu:
                return small_batch_gated_up(x, wq, uq, norm_weight=norm_weight, norm_eps=1e-5, gate_scale=sq,
                                            up_scale=su, **config)
            return small_batch_linear(x, wq, norm_weight=norm_weight, norm_eps=1e-5, residual=res, gate=z,
                                      weight_scale=sq, **config)

        expected = unfused(weights[0]).float()
        # (label, call, configuration, stages, the weight copies it reads, bytes per weight)
        runs = [(label, call, config, 1, weights, 2) for label, call in (("separate kernels", unfused),
                                                                          ("folded", folded))
                for config in args.gemv_configs or FUSED_GEMV_CONFIGS]
        if m == 1:  # the engine's one-row call, its loop pipelined; int8, at K blocks of 256 bytes too
            engine_config = default_config(m, n, k, torch.device(DEVICE), gated=swiglu)
            runs += [("folded", folded, engine_config, stages, weights, 2) for stages in FUSED_GEMV_STAGES]
            int8_weights = [tuple(quantize_rows(w) for w in ws) for ws in weights]
            bn, bk, warps = engine_config
            runs += [("folded, int8 weights", folded_int8, config, 1, int8_weights, 1)
                     for config in (engine_config, (bn, 2 * bk, warps))]
            dequantized = tuple((q.to(bf16) * s[:, None]) for q, s in int8_weights[0])
            expected_int8 = folded(dequantized).float()
        elif "norm" in fused or res is not None:  # at the default configuration, as the engines call it
            runs.append(("prepared norm", lambda w, **config: prepared(w), (0, 0, 0), 1, weights, 2))
        for label, call, (bn, bk, warps), stages, copies_read, width in runs:
            config = dict(block_n=bn, block_k=bk, num_warps=warps, stages=stages) if bn else {}
            what = (f"bn{bn} bk{bk} w{warps}" if bn else "default configuration") + (
                f" {stages} stages" if stages > 1 else "")
            name = f"gemv-fused {label} {shape} {what}"
            got = refused_or(name, lambda: call(copies_read[0], **config))
            if got is None:
                continue
            check_close(name, got, expected_int8 if width == 1 else expected, 2e-2)

            def run(call=call, config=config, copies_read=copies_read):
                for w in copies_read:
                    call(w, **config)
            rec.run("gemv-fused", shape, f"{label} ({what})", lambda run=run: bench_graph(run) / copies,
                    TB_per_s=lambda ms, width=width: matrices * n * k * width / (ms * 1e-3) / 1e12)
        weights.clear()
        if m == 1:
            int8_weights.clear()
        torch.cuda.empty_cache()


# The 8B 0% hybrid's Mamba layer at batch 1 as its compiled step calls the split-K GEMV (norms
# folded, residual adds inside): in_proj (8480 x 4096, its input norm), out_proj (4096 x 4096,
# Mamba2's gated norm, the residual), gate+up (2 x 14336 x 4096, the MLP's norm, SiLU) and down
# (4096 x 14336, the residual). CHAIN_LAYERS copies, each with weights of its own (1.9 GB).
CHAIN_LAYERS = 8
# (label, MAMBAIFY_PDL, MAMBAIFY_GEMV_STAGES): the GEMVs launched one after another (their
# one-row loops as they run by default, then pipelined), and as programmatic dependent launches.
CHAIN_VARIANTS = [("one after another", "0", "1"), ("one after another, loop in 3 stages", "0", "3"),
                  ("one after another, loop in 4 stages", "0", "4"), ("programmatic dependent launch", "1", "1")]
CHAIN_MATRICES = {"in_proj": (8480, 4096), "out_proj": (4096, 4096), "gate": (14336, 4096), "up": (14336, 4096),
                  "down": (4096, 14336)}


def bench_gemv_chain(rec: Recorder, torch, bench_graph) -> None:
    """CHAIN_LAYERS layers' GEMVs back to back in one CUDA graph, each call's input made from
    the one before's output as in the step (the SSD step left out: out_proj reads a slice of
    in_proj's output as y and another as z), at the default configurations, as CHAIN_VARIANTS
    launch them: one after another, with the one-row loops pipelined, and as programmatic
    dependent launches (MAMBAIFY_PDL=1: each GEMV reads its first weight tiles while the one
    ahead finishes). Per layer: time, the weights' TB/s; every variant must give the first's
    bits. Against the kernels timed one by one (``--only gemv-fused``), the difference is what
    the boundaries between kernels cost, which PDL is meant to hide."""
    import os

    from mambaify import ops
    from mambaify.ops.triton.gemv import small_batch_gated_up, small_batch_linear

    bf16, width = torch.bfloat16, CHAIN_MATRICES["out_proj"][0]
    torch.manual_seed(0)
    layers = [{name: torch.randn(n, k, device=DEVICE, dtype=bf16) * k ** -0.5 for name, (n, k) in CHAIN_MATRICES.items()}
              for _ in range(CHAIN_LAYERS)]
    norms = [1 + 0.1 * torch.randn(width, device=DEVICE, dtype=bf16) for _ in range(3)]
    nbytes = sum(n * k * 2 for n, k in CHAIN_MATRICES.values())
    hidden = torch.randn(1, width, device=DEVICE, dtype=bf16)

    def step():
        h = hidden
        for w in layers:
            projected = small_batch_linear(h, w["in_proj"], norm_weight=norms[0], norm_eps=1e-5)
            z, y = projected[:, :width], projected[:, width:2 * width]
            h = small_batch_linear(y, w["out_proj"], norm_weight=norms[1], norm_eps=1e-5, residual=h, gate=z)
            a = small_batch_gated_up(h, w["gate"], w["up"], norm_weight=norms[2], norm_eps=1e-5)
            h = small_batch_linear(a, w["down"], residual=h)
        return h

    shape = f"m1 x {CHAIN_LAYERS} layers (in_proj, out_proj, gate+up, down)"
    per_layer = {"TB_per_s": lambda ms: nbytes * CHAIN_LAYERS / (ms * 1e-3) / 1e12,
                 "ms_per_layer": lambda ms: ms / CHAIN_LAYERS}
    switches = ("MAMBAIFY_PDL", "MAMBAIFY_GEMV_STAGES")
    before = {name: os.environ.get(name) for name in switches}
    results = {}
    try:
        for label, pdl, stages in CHAIN_VARIANTS:
            os.environ["MAMBAIFY_PDL"], os.environ["MAMBAIFY_GEMV_STAGES"] = pdl, stages
            if pdl == "1" and not ops.pdl_enabled(torch.device(DEVICE)):
                print("gemv-chain: this GPU has no programmatic dependent launch (Hopper on); skipped", flush=True)
                continue
            results[label] = step().float()
            rec.run("gemv-chain", shape, label, lambda: bench_graph(step), **per_layer)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    first, *others = results or [None]
    for label in others:  # the same sums in the same order: the same bits
        if not torch.equal(results[first], results[label]):
            error = f"{label} changed the output: max diff {(results[first] - results[label]).abs().max().item():.3e}"
            print(f"gemv-chain: {error}", flush=True)
            rec.rows.append({"group": "gemv-chain", "shape": shape, "impl": "output check", "error": error})
    layers.clear()
    torch.cuda.empty_cache()


def verify_markdown(rows: list[dict]) -> str:
    """The verify rows again, with the cost of a call in plain decode steps."""
    rows = [r for r in rows if r["group"].startswith("verify") and "ms" in r]
    if not rows:
        return ""
    lines = [
        "",
        "## Speculative verify, one Mamba layer (--verify-shape)",
        "",
        "A call over K + 1 tokens, its cost in plain one-token decode steps (fewer than the tokens a",
        "call commits on average = the Mamba layer gains), and the bandwidth it achieves.",
        "",
        "| group | shape | implementation | ms | cost in steps | GB/s |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        cost = r.get("cost_in_steps")
        gbs = r.get("GB_per_s")
        lines.append(
            f"| {r['group']} | {r['shape']} | {r['impl']} | {r['ms']:.4f} | "
            f"{'' if cost is None else format(cost, '.2f')} | {'' if gbs is None else format(gbs, ',.0f')} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Kernel benchmarks",
        "",
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}; "
        "median ms (triton.testing.do_bench / do_bench_cudagraph).",
        "",
        "| group | shape | implementation | ms | tokens/s | GB/s | % of 4.08 TB/s | TB/s (weights) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(v, f):
        return format(v, f) if isinstance(v, (int, float)) else ""

    for r in rows:
        ms = num(r.get("ms"), ".4f") if "error" not in r else f"error: {r['error']}"
        lines.append(
            f"| {r['group']} | {r['shape']} | {r['impl']} | {ms} | {num(r.get('tokens_per_s'), ',.0f')} "
            f"| {num(r.get('GB_per_s'), ',.0f')} | {num(r.get('pct_of_hbm_peak'), '.1f')} "
            f"| {num(r.get('TB_per_s'), '.2f')} |"
        )
    return "\n".join(lines) + "\n" + verify_markdown(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefill = args.prefill or [parse_shape(s, "bthpn") for s in DEFAULT_PREFILL]
    decode = args.decode or [parse_shape(s, "bhpn") for s in DEFAULT_DECODE]

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    def bench(fn):
        return do_bench(fn, rep=args.rep, return_mode="median")

    def bench_graph(fn):
        fn()  # compile / autotune outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=args.rep, return_mode="median")

    try:
        import fla

        fla_version = fla.__version__
    except Exception:
        fla_version = "unavailable"
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hbm_peak_bytes_per_s": HBM_BYTES_PER_S,
    }
    print(json.dumps(meta), flush=True)
    rec = Recorder()
    if args.only in (None, "scan"):
        for shape in prefill:
            bench_scan(rec, shape, args, torch, bench)
            bench_norm_training(rec, shape, torch, bench)
            torch.cuda.empty_cache()
    if args.only in (None, "decode"):
        for shape in decode:
            bench_decode(rec, shape, args, torch, bench, bench_graph)
    if args.only in (None, "verify"):
        for b in args.verify_batch:
            for k in args.verify_k:
                bench_verify(rec, b, k, args, torch, bench_graph)
    if args.only == "gemv":
        for m in args.gemv_batch:
            bench_gemv(rec, m, args, torch, bench_graph)
    if args.only == "gemv-fused":
        for m in args.gemv_batch:
            bench_gemv_fused(rec, m, args, torch, bench_graph)
    if args.only == "gemv-chain":
        bench_gemv_chain(rec, torch, bench_graph)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_kernels.json").write_text(json.dumps({"meta": meta, "results": rec.rows}, indent=2))
    (args.out_dir / "bench_kernels.md").write_text(markdown(rec.rows, meta))
    print(markdown(rec.rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
