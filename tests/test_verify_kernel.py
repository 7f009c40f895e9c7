"""Speculative verification of a Mamba layer: reference, PyTorch path and Triton kernels.

The oracle is plain sequential decoding: ``ops.ssd_step`` token by token (and
``ops.causal_conv1d`` over the whole accepted stream for the conv), in float64.

* reference.ssd_verify / conv_verify and the ops.* PyTorch paths: always.
* The Triton kernels (fused verify, the naive store-every-state variant, the conv window):
  compiled on CUDA (``gpu`` marker), else in Triton's interpreter on the CPU, in a subprocess
  started with TRITON_INTERPRET=1 (:func:`test_kernels_in_triton_interpreter`, as in
  tests/test_triton_ops.py, which explains why).

Multi-round tests run several verify calls with varying numbers of new tokens and per-row
accepted counts (0, everything, and in between), caches that start as NaN (nothing stale may be
read), and compare every output and checkpoint with decoding the accepted stream step by step.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mambaify import ops
from tests._triton_cases import (
    HAS_CUDA,
    INTERPRET,
    gpu,
    kernel_module,
    needs_triton,
    run_interpreter_cases,
)


# Odd sizes throughout: n and p no powers of two, so every mask matters.
b_, h_, n_, p_, T_ = 3, 2, 5, 7, 7
ROUNDS = [7, 1, 5, 3]  # new tokens per verify call (<= T): full, fewer than the counts before, ...


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# Tolerances against the float64 oracle on the same (rounded) inputs: y in the input dtype,
# the state in float32 (float64 for float64 inputs).
Y_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
STATE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def randn(*shape, g, dtype=torch.float64, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def wide(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_params(h, n, p, b, dtype, device, g):
    """A (h), D (h) and a non-zero initial checkpoint (b,h,n,p) in the state dtype."""
    return SimpleNamespace(
        A=(-torch.rand(h, generator=g, dtype=torch.float64) * 2 - 0.1).to(device, wide(dtype)),
        D=randn(h, g=g, dtype=wide(dtype), device=device),
        S0=randn(b, h, n, p, g=g, dtype=wide(dtype), device=device),
    )


def new_tokens(b, t, h, n, p, dtype, device, g, shared_B=False):
    """One call's inputs. x is a strided slice of a wider tensor; with ``shared_B`` B is one
    kv head expanded to all heads (stride 0), as the mixer's repeat can hand it over."""
    x = randn(b, t, h, p + 3, g=g, dtype=dtype, device=device)[..., 1 : p + 1]
    B = randn(b, t, 1 if shared_B else h, n, g=g, dtype=dtype, device=device).expand(b, t, h, n)
    return SimpleNamespace(
        x=x,
        dt=F.softplus(randn(b, t, h, g=g) - 0.5).to(device, dtype),
        B=B,
        C=randn(b, t, h, n, g=g, dtype=dtype, device=device),
    )


def round_counts(b, prev_t, g, device):
    """Accepted counts for the next call: row 0 none, row 1 all, the rest random in [0, prev_t]."""
    c = torch.randint(0, prev_t + 1, (b,), generator=g)
    c[0], c[1 % b] = 0, prev_t
    return c.to(device)


def cpu64(v):
    return None if v is None else v.detach().double().cpu()


# --------------------------------------------------------------------------- the oracle


def step_row(state, tok, i, j, A, D=None):
    """ops.ssd_step on token j of row i of ``tok`` (a namespace of x, dt, B, C)."""
    row = slice(i, i + 1)
    return ops.ssd_step(state, tok.x[row, j], tok.dt[row, j], A, tok.B[row, j], tok.C[row, j], D)


def decode_rounds_stepwise(S0, A, D, rounds, counts):
    """Sequential decoding of what a verify loop computes, per row, in float64.

    rounds[r]: the r-th call's new tokens; counts[r] (b,): how many of call r-1's tokens were
    accepted (counts[0] is irrelevant). Returns, per call, (y (b,t,h,p), checkpoint (b,h,n,p)):
    the outputs of its new tokens after the accepted stream, and the state after that stream.
    """
    A, D = cpu64(A), cpu64(D)
    b = S0.shape[0]
    out = []
    states = [cpu64(S0[i : i + 1]) for i in range(b)]
    for r, tok in enumerate(rounds):
        tok = SimpleNamespace(**{k: cpu64(v) for k, v in vars(tok).items()})
        ys, ckpts = [], []
        for i in range(b):
            if r > 0:
                prev = SimpleNamespace(**{k: cpu64(v) for k, v in vars(rounds[r - 1]).items()})
                for j in range(int(counts[r][i])):
                    _, states[i] = step_row(states[i], prev, i, j, A, D)
            s, y_row = states[i], []
            for j in range(tok.x.shape[1]):
                y, s = step_row(s, tok, i, j, A, D)
                y_row.append(y)
            ys.append(torch.stack(y_row, 1) if y_row else tok.x[i : i + 1])
            ckpts.append(states[i])
        out.append((torch.cat(ys), torch.cat(ckpts)))
    return out


def run_rounds(verify, dtype, device, seed, ts=ROUNDS, shared_B=False):
    """Drive ``verify(counts, tokens) -> (y, checkpoint)`` over the calls ts and compare each
    result with :func:`decode_rounds_stepwise`."""
    g = torch.Generator().manual_seed(seed)
    params = layer_params(h_, n_, p_, b_, dtype, device, g)
    rounds = [new_tokens(b_, t, h_, n_, p_, dtype, device, g, shared_B) for t in ts]
    counts = [torch.zeros(b_, dtype=torch.long, device=device)]
    counts += [round_counts(b_, ts[r - 1], g, device) for r in range(1, len(ts))]
    expected = decode_rounds_stepwise(params.S0, params.A, params.D, rounds, counts)
    run = verify(params)
    for r, (tok, c) in enumerate(zip(rounds, counts)):
        y, checkpoint = run(c, tok)
        y64, ckpt64 = expected[r]
        assert y.dtype == tok.x.dtype and y.shape == tok.x.shape
        assert rel_err(y, y64) < Y_TOL[dtype], f"call {r}: y"
        assert rel_err(checkpoint, ckpt64) < STATE_TOL[dtype], f"call {r}: checkpoint"
    return params, rounds, counts


def fused_runner(fn, dtype, device, T=T_, **kw):
    """A verify loop on ``fn`` = ssd_verify_inplace (ops-level or kernel), caches starting as NaN."""

    def make(params):
        ckpt = params.S0.clone()
        x_cache = torch.full((b_, T, h_, p_), float("nan"), dtype=dtype, device=device)
        dt_cache = torch.full((b_, T, h_), float("nan"), dtype=dtype, device=device)
        B_cache = torch.full((b_, T, h_, n_), float("nan"), dtype=dtype, device=device)

        def run(counts, tok):
            y = fn(ckpt, x_cache, dt_cache, B_cache, counts, tok.x, tok.dt, params.A, tok.B, tok.C, params.D, **kw)
            t = tok.x.shape[1]
            # The caches now hold the new inputs (as stored, exactly) and nothing else changed.
            assert torch.equal(x_cache[:, :t], tok.x.to(dtype))
            assert torch.equal(dt_cache[:, :t], tok.dt) and torch.equal(B_cache[:, :t], tok.B)
            return y, ckpt.clone()

        return run

    return make


def naive_runner(fn, dtype, device, T=T_, **kw):
    def make(params):
        ckpt = params.S0.clone()
        states = torch.full((b_, T, h_, n_, p_), float("nan"), dtype=ckpt.dtype, device=device)

        def run(counts, tok):
            y = fn(ckpt, states, counts, tok.x, tok.dt, params.A, tok.B, tok.C, params.D, **kw)
            return y, ckpt.clone()

        return run

    return make


# --------------------------------------------------------------------------- the reference


def test_reference_fold_and_outputs_equal_stepping():
    """ssd_verify: the folded state is the state after stepping the first counts[b] cached
    tokens (exactly the checkpoint where counts = 0), and y is stepping the new tokens from it."""
    g = torch.Generator().manual_seed(0)
    params = layer_params(h_, n_, p_, 4, torch.float64, "cpu", g)
    cached = new_tokens(4, T_, h_, n_, p_, torch.float64, "cpu", g)
    cached.x = cached.x.clone()
    cached.x[:, 3:] = float("nan")  # slots past every count: must not be read
    new = new_tokens(4, 5, h_, n_, p_, torch.float64, "cpu", g, shared_B=True)
    counts = torch.tensor([0, 3, 1, 2])
    y, folded = ops.ssd_verify(
        params.S0, cached.x, cached.dt, cached.B, counts, new.x, new.dt, params.A, new.B, new.C, params.D
    )
    assert torch.equal(folded[0], params.S0[0])
    for i in range(4):
        s = params.S0[i : i + 1]
        for j in range(int(counts[i])):
            _, s = step_row(s, cached, i, j, params.A)
        assert (folded[i : i + 1] - s).abs().max() < 1e-12
        for j in range(5):
            y_j, s = step_row(s, new, i, j, params.A, params.D)
            assert (y[i, j] - y_j[0]).abs().max() < 1e-12


def test_reference_checks_inputs():
    g = torch.Generator().manual_seed(1)
    params = layer_params(h_, n_, p_, 2, torch.float64, "cpu", g)
    cached = new_tokens(2, 4, h_, n_, p_, torch.float64, "cpu", g)
    new = new_tokens(2, 3, h_, n_, p_, torch.float64, "cpu", g)
    args = lambda counts, tok=new, cache=cached: (  # noqa: E731
        params.S0, cache.x, cache.dt, cache.B, counts, tok.x, tok.dt, params.A, tok.B, tok.C,
    )
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        ops.ssd_verify(*args(torch.tensor([0, 5])))
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        ops.ssd_verify_inplace(*args(torch.tensor([-1, 0])))
    with pytest.raises(ValueError, match="integer"):
        ops.ssd_verify(*args(torch.tensor([0.0, 1.0])))
    too_many = new_tokens(2, 5, h_, n_, p_, torch.float64, "cpu", g)
    with pytest.raises(ValueError, match="do not fit the input caches of length 4"):
        ops.ssd_verify(*args(torch.tensor([0, 0]), tok=too_many))
    bad = SimpleNamespace(**{**vars(new), "C": new.C[..., :-1]})
    with pytest.raises(ValueError, match=r"C \(2, 3, 2, 4\) \(expected \(2, 3, 2, 5\)\)"):
        ops.ssd_verify(*args(torch.tensor([0, 0]), tok=bad))
    window = torch.zeros(2, 3 + 4, 6)
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        ops.conv_verify_inplace(window, torch.tensor([0, 9]), torch.zeros(2, 3, 6), torch.zeros(6, 4), None)
    with pytest.raises(ValueError, match="do not fit a window"):
        ops.conv_verify(window, torch.tensor([0, 0]), torch.zeros(2, 5, 6), torch.zeros(6, 4))


# --------------------------------------------------------------------------- ops.* PyTorch paths


@pytest.mark.parametrize("shared_B", [False, True])
def test_ops_verify_inplace_rounds_equal_sequential_decoding(shared_B):
    run_rounds(fused_runner(ops.ssd_verify_inplace, torch.float64, "cpu"), torch.float64, "cpu", seed=2, shared_B=shared_B)


def test_ops_verify_store_states_rounds_equal_sequential_decoding():
    run_rounds(naive_runner(ops.ssd_verify_store_states, torch.float64, "cpu"), torch.float64, "cpu", seed=3)


def test_ops_verify_inplace_writes_into_out_and_fold_only_call():
    g = torch.Generator().manual_seed(4)
    params = layer_params(h_, n_, p_, b_, torch.float64, "cpu", g)
    cached = new_tokens(b_, T_, h_, n_, p_, torch.float64, "cpu", g)
    caches = [cached.x.contiguous(), cached.dt.clone(), cached.B.contiguous()]
    new = new_tokens(b_, 4, h_, n_, p_, torch.float64, "cpu", g)
    counts = torch.tensor([T_, 0, 2])
    y_ref, folded = ops.ssd_verify(params.S0, *caches, counts, new.x, new.dt, params.A, new.B, new.C, params.D)
    ckpt, out = params.S0.clone(), torch.empty(new.x.shape, dtype=torch.float64)
    y = ops.ssd_verify_inplace(ckpt, *caches, counts, new.x, new.dt, params.A, new.B, new.C, params.D, out=out)
    assert y is out and torch.equal(y, y_ref) and torch.equal(ckpt, folded)
    # t = 0: fold only (what the engine does before handing the state to plain decoding).
    empty = new_tokens(b_, 0, h_, n_, p_, torch.float64, "cpu", g)
    counts = torch.tensor([4, 1, 0])
    expected = ops.ssd_fold(ckpt, *caches, counts, params.A)
    ops.ssd_verify_inplace(ckpt, *caches, counts, empty.x, empty.dt, params.A, empty.B, empty.C, params.D)
    assert torch.equal(ckpt, expected)


def conv_rounds(verify, dtype, device, seed, K=4, c=13, ts=ROUNDS, silu=False, bias=True):
    """Drive ``verify(window, counts, xBC, weight, bias) -> y`` over the calls ts; each output
    must equal causal_conv1d over the row's accepted stream, and the window's first
    d_conv-1+t rows [history, xBC]."""
    g = torch.Generator().manual_seed(seed)
    T = max(ts)
    w = randn(c, K, g=g, dtype=dtype, device=device)
    bias_ = randn(c, g=g, dtype=dtype, device=device) if bias else None
    prompt = randn(b_, K - 1, c, g=g, dtype=dtype, device=device)  # the inputs before the first call
    window = torch.cat([prompt, torch.full((b_, T, c), float("nan"), dtype=dtype, device=device)], 1)
    accepted = [prompt[i] for i in range(b_)]  # per row: every raw input so far that was kept
    prev_t, prev_xBC = 0, None
    for r, t in enumerate(ts):
        counts = round_counts(b_, prev_t, g, device) if r else torch.zeros(b_, dtype=torch.long, device=device)
        if r:
            accepted = [torch.cat([accepted[i], prev_xBC[i, : int(counts[i])]]) for i in range(b_)]
        xBC = randn(b_, t + 2, c, g=g, dtype=dtype, device=device)[:, 1 : t + 1]  # strided rows
        window_before = window.clone()
        y = verify(window, counts, xBC, w, bias_)
        for i in range(b_):
            stream = torch.cat([accepted[i], xBC[i]])
            y64, _ = ops.causal_conv1d(cpu64(stream[K - 1 :])[None], cpu64(w), cpu64(bias_), cpu64(stream[: K - 1]).T[None])
            if silu:
                y64 = F.silu(y64)
            assert rel_err(y[i], y64[0, -t:]) < Y_TOL[dtype], f"call {r} row {i}"
            assert torch.equal(window[i, : K - 1 + t], stream[-(K - 1 + t) :]), f"call {r} row {i}: window"
            rest = K - 1 + t
            torch.testing.assert_close(window[i, rest:], window_before[i, rest:], rtol=0, atol=0, equal_nan=True)
        prev_xBC = xBC
        prev_t = t


@pytest.mark.parametrize("K", [4, 2, 1])
def test_ops_conv_verify_inplace_rounds_equal_causal_conv(K):
    conv_rounds(ops.conv_verify_inplace, torch.float64, "cpu", seed=5, K=K)


def test_ops_conv_verify_inplace_silu_and_out():
    conv_rounds(
        lambda *a: ops.conv_verify_inplace(*a, silu=True), torch.float64, "cpu", seed=6, silu=True, bias=False
    )
    window, xBC, w = torch.randn(2, 3 + 2, 5), torch.randn(2, 2, 5), torch.randn(5, 4)
    out = torch.empty(2, 2, 5)
    y = ops.conv_verify_inplace(window, torch.tensor([1, 2]), xBC, w, None, out=out)
    assert y is out


# --------------------------------------------------------------------------- Triton kernels


@needs_triton
@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="kernels run compiled on CUDA / this is the subprocess")
def test_kernels_in_triton_interpreter():
    """The ``interp`` kernel cases below, in a fresh interpreter with TRITON_INTERPRET=1."""
    out = run_interpreter_cases(__file__, "interp and not in_triton_interpreter", timeout=600)
    assert " skipped" not in out


@pytest.fixture
def kernels(request):
    """mambaify.ops.triton, compiled for CUDA or, in the subprocess above, interpreted."""
    return kernel_module(request, "mambaify.ops.triton")


KERNEL_CASES = [
    pytest.param("cpu", torch.float64, marks=needs_triton, id="interp-f64"),
    pytest.param("cpu", torch.float32, marks=needs_triton, id="interp-f32"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-f32"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
]
# (device, input dtype, p columns per program). p = 7 in one program per head, or split over two
# (block 4): then dt and B, which every p-block of a head replays, may only be overwritten by
# the last of them (the ticket counter); the interpreter runs programs one after another, so a
# wrong order shows. The interpreter is slow: float32 there only where the precision differs.
def _split_cases(interp_f32: bool):
    cases = [
        pytest.param("cpu", torch.float64, None, marks=needs_triton, id="interp-f64-p-whole"),
        pytest.param("cpu", torch.float64, 4, marks=needs_triton, id="interp-f64-p-split"),
    ]
    if interp_f32:
        cases.append(pytest.param("cpu", torch.float32, None, marks=needs_triton, id="interp-f32-p-whole"))
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        cases.append(pytest.param("cuda", dtype, None, marks=gpu, id=f"cuda-{name}-p-auto"))
        cases.append(pytest.param("cuda", dtype, 4, marks=gpu, id=f"cuda-{name}-p-split"))
    return cases


@pytest.mark.parametrize("device,dtype,block_p", _split_cases(interp_f32=True))
def test_ssd_verify_kernel_equals_reference(kernels, device, dtype, block_p):
    """One call for each t = 1..7 against reference.ssd_verify, counts 0, T and between (in the
    interpreter, every t once in float64, and a few more for the other cases)."""
    g = torch.Generator().manual_seed(7)
    params = layer_params(h_, n_, p_, b_, dtype, device, g)
    every_t = device == "cuda" or (dtype == torch.float64 and block_p is None)
    for t in range(1, T_ + 1) if every_t else (1, 4, T_):
        cached = new_tokens(b_, T_, h_, n_, p_, dtype, device, g)
        caches = [cached.x.contiguous(), cached.dt.clone(), cached.B.contiguous()]
        new = new_tokens(b_, t, h_, n_, p_, dtype, device, g, shared_B=t % 2 == 1)
        counts = torch.tensor([0, T_, t // 2], device=device, dtype=torch.int32)
        y_ref, folded = ops.ssd_verify(
            cpu64(params.S0), *map(cpu64, caches), counts.cpu(), cpu64(new.x), cpu64(new.dt), cpu64(params.A),
            cpu64(new.B), cpu64(new.C), cpu64(params.D),
        )
        ckpt, before = params.S0.clone(), [c.clone() for c in caches]
        y = kernels.ssd_verify_inplace(
            ckpt, *caches, counts, new.x, new.dt, params.A, new.B, new.C, params.D, block_p=block_p
        )
        assert y.dtype == dtype and y.shape == new.x.shape
        assert rel_err(y, y_ref) < Y_TOL[dtype], f"t={t}"
        assert rel_err(ckpt, folded) < STATE_TOL[dtype], f"t={t}"
        assert torch.equal(ckpt[0], params.S0[0])  # nothing to fold: bit for bit
        for cache, old, new_value in zip(caches, before, (new.x, new.dt, new.B)):
            assert torch.equal(cache[:, :t], new_value) and torch.equal(cache[:, t:], old[:, t:])


# prefetch: every token's inputs loaded before the kernel's loops (the default), or per step.
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "per-step-loads"])
@pytest.mark.parametrize("device,dtype,block_p", _split_cases(interp_f32=False))
def test_ssd_verify_kernel_rounds_equal_sequential_decoding(kernels, device, dtype, block_p, prefetch):
    run_rounds(fused_runner(kernels.ssd_verify_inplace, dtype, device, block_p=block_p, prefetch=prefetch),
               dtype, device, seed=8, shared_B=True)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "per-step-loads"])
@pytest.mark.parametrize("device,dtype,block_p", _split_cases(interp_f32=False))
def test_naive_store_states_kernel_rounds_equal_sequential_decoding(kernels, device, dtype, block_p, prefetch):
    run_rounds(naive_runner(kernels.ssd_verify_store_states, dtype, device, block_p=block_p, prefetch=prefetch),
               dtype, device, seed=9)


def test_verify_kernel_warps_hold_the_prefetched_tiles():
    """One warp where the tiles fit (SmolLM2's hybrid: n = 64, 8 columns per program, K = 3),
    more as they grow (the 8B shape: n = 128, 16 columns; K = 8), Triton's 4 without prefetch,
    and MAMBAIFY_VERIFY_PREFETCH=0 turns it off."""
    import os

    verify = pytest.importorskip("mambaify.ops.triton.verify")
    assert verify._num_warps(4, 64, 8, True) == 1
    assert verify._num_warps(4, 128, 16, True) == 2 and verify._num_warps(16, 128, 16, True) == 4
    assert verify._num_warps(4, 64, 8, False) == 4
    # Prefetched only where one warp holds the tiles: at batch 1 it was faster on the H200, at the
    # 8B shape's batch 8 (n = 128, 64 columns a program: four warps) slower.
    assert verify._prefetch_pays(4, 64, 8) and verify._prefetch_pays(4, 128, 8)
    assert not verify._prefetch_pays(4, 128, 64) and not verify._prefetch_pays(16, 128, 16)
    saved = os.environ.get("MAMBAIFY_VERIFY_PREFETCH")
    try:
        os.environ["MAMBAIFY_VERIFY_PREFETCH"] = "0"
        assert verify.prefetch_default() is False
        os.environ["MAMBAIFY_VERIFY_PREFETCH"] = "1"
        assert verify.prefetch_default() is True
    finally:
        os.environ.pop("MAMBAIFY_VERIFY_PREFETCH", None)
        if saved is not None:
            os.environ["MAMBAIFY_VERIFY_PREFETCH"] = saved


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_ssd_verify_kernel_without_D_into_out(kernels, device, dtype):
    g = torch.Generator().manual_seed(10)
    params = layer_params(h_, n_, p_, b_, dtype, device, g)
    cached = new_tokens(b_, 4, h_, n_, p_, dtype, device, g)
    caches = [cached.x.contiguous(), cached.dt.clone(), cached.B.contiguous()]
    new = new_tokens(b_, 3, h_, n_, p_, dtype, device, g)
    counts = torch.tensor([2, 4, 1], device=device)
    y_ref, folded = ops.ssd_verify(
        *map(cpu64, (params.S0, *caches)), counts.cpu(), *map(cpu64, (new.x, new.dt, params.A, new.B, new.C))
    )
    ckpt, out = params.S0.clone(), torch.empty(new.x.shape, dtype=dtype, device=device)
    y = kernels.ssd_verify_inplace(ckpt, *caches, counts, new.x, new.dt, params.A, new.B, new.C, None, out=out)
    assert y is out and rel_err(y, y_ref) < Y_TOL[dtype] and rel_err(ckpt, folded) < STATE_TOL[dtype]
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 4\]"):
        kernels.ssd_verify_inplace(ckpt, *caches, counts + 3, new.x, new.dt, params.A, new.B, new.C)


def grouped_call(dtype, device, seed):
    """A verify call as the engine makes it: x and B per group of 3 heads (2 groups, 6 heads),
    dt the raw projection with a bias; and the same call spelled out per head, dt softplus-ed in
    dt's dtype (as the kernel takes it, and caches it)."""
    g = torch.Generator().manual_seed(seed)
    b, t, groups, rep, n, p, T = 3, 3, 2, 3, 5, 7, 4
    h = groups * rep
    params = layer_params(h, n, p, b, dtype, device, g)
    cached = new_tokens(b, T, h, n, p, dtype, device, g)
    caches = [cached.x.contiguous(), cached.dt.clone(), cached.B.contiguous()]
    grouped = SimpleNamespace(
        x=randn(b, t, groups, p, g=g, dtype=dtype, device=device), B=randn(b, t, groups, n, g=g, dtype=dtype, device=device),
        C=randn(b, t, h, n, g=g, dtype=dtype, device=device), dt=randn(b, t, h, g=g, dtype=dtype, device=device),
        dt_bias=randn(h, g=g, dtype=dtype, device=device))
    grouped.dt[1, 0, 2] = 25.0  # above softplus's threshold
    spelled = SimpleNamespace(
        x=grouped.x.repeat_interleave(rep, dim=2), B=grouped.B.repeat_interleave(rep, dim=2), C=grouped.C,
        dt=F.softplus(grouped.dt + grouped.dt_bias))
    return params, caches, grouped, spelled, torch.tensor([2, 4, 0], device=device)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "per-step-loads"])
@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_ssd_verify_kernel_reads_head_groups_and_raw_dt(kernels, device, dtype, prefetch):
    params, caches, grouped, spelled, counts = grouped_call(dtype, device, seed=12)
    y_ref, folded = ops.ssd_verify(*map(cpu64, (params.S0, *caches)), counts.cpu(),
                                   *map(cpu64, (spelled.x, spelled.dt, params.A, spelled.B, spelled.C, params.D)))
    ckpt = params.S0.clone()
    y = kernels.ssd_verify_inplace(ckpt, *caches, counts, grouped.x, grouped.dt, params.A, grouped.B, grouped.C,
                                   params.D, dt_bias=grouped.dt_bias, prefetch=prefetch)
    assert y.shape == spelled.x.shape and rel_err(y, y_ref) < Y_TOL[dtype] and rel_err(ckpt, folded) < STATE_TOL[dtype]
    # The caches hold what the next call replays: every head's x and B, and the dt it used.
    t = grouped.x.shape[1]
    assert torch.equal(caches[0][:, :t], spelled.x) and torch.equal(caches[2][:, :t], spelled.B)
    assert rel_err(caches[1][:, :t], spelled.dt) < Y_TOL[dtype]


def test_ssd_verify_torch_path_reads_head_groups_and_raw_dt():
    params, caches, grouped, spelled, counts = grouped_call(torch.float64, "cpu", seed=12)
    expected_caches = [c.clone() for c in caches]
    ckpt, expected_ckpt = params.S0.clone(), params.S0.clone()
    y = ops.ssd_verify_inplace(ckpt, *caches, counts, grouped.x, grouped.dt, params.A, grouped.B, grouped.C, params.D,
                               dt_bias=grouped.dt_bias)
    y_ref = ops.ssd_verify_inplace(expected_ckpt, *expected_caches, counts, spelled.x, spelled.dt, params.A,
                                   spelled.B, spelled.C, params.D)
    assert torch.equal(y, y_ref) and torch.equal(ckpt, expected_ckpt)
    assert all(torch.equal(a, e) for a, e in zip(caches, expected_caches))
    with pytest.raises(ValueError, match="x .* \\(expected"):
        ops.ssd_verify_inplace(ckpt, *caches, counts, grouped.x[:, :, :1].expand(3, 3, 4, 7), grouped.dt, params.A,
                               grouped.B, grouped.C)


CONV_SHAPES = [(4, False), (4, True), (2, False), (1, False)]  # (d_conv, silu)
CONV_CASES = [
    pytest.param(*case.values, K, silu, marks=case.marks, id=f"{case.id}-K{K}{'-silu' if silu else ''}")
    for case in KERNEL_CASES
    for K, silu in CONV_SHAPES
    if case.id != "interp-f32" or (K, silu) == (4, True)  # the interpreter is slow: float32 once
]


@pytest.mark.parametrize("device,dtype,K,silu", CONV_CASES)
def test_conv_verify_kernel_rounds_equal_causal_conv(kernels, device, dtype, K, silu):
    fn = lambda *a: kernels.conv_verify_inplace(*a, silu=silu)  # noqa: E731
    conv_rounds(fn, dtype, device, seed=11, K=K, silu=silu, bias=K != 2)


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_8b_shaped_verify_equals_reference(kernels, batch):
    """The benchmark's shape (32 heads of 128, d_state 128) with the default p split (tickets)."""
    h, n, p, T, t = 32, 128, 128, 9, 9
    g = torch.Generator().manual_seed(12)
    dtype = torch.bfloat16
    params = layer_params(h, n, p, batch, dtype, "cuda", g)
    cached = new_tokens(batch, T, h, n, p, dtype, "cuda", g)
    caches = [cached.x.contiguous(), cached.dt.clone(), cached.B.contiguous()]
    new = new_tokens(batch, t, h, n, p, dtype, "cuda", g, shared_B=True)
    counts = torch.randint(0, T + 1, (batch,), generator=g).cuda()
    y_ref, folded = ops.ssd_verify(
        *map(cpu64, (params.S0, *caches)), counts.cpu(), *map(cpu64, (new.x, new.dt, params.A, new.B, new.C, params.D))
    )
    ckpt = params.S0.clone()
    y = ops.ssd_verify_inplace(ckpt, *caches, counts, new.x, new.dt, params.A, new.B, new.C, params.D)
    assert rel_err(y, y_ref) < 1e-2 and rel_err(ckpt, folded) < 1e-5
    assert torch.equal(caches[2][:, :t], new.B) and torch.equal(caches[1][:, :t], new.dt)

    states = torch.full((batch, T, h, n, p), float("nan"), device="cuda")
    states[:, : int(counts.max())] = 0  # states past the counts are never read
    for i in range(batch):
        c = int(counts[i])
        if c:
            states[i, c - 1] = folded[i].cuda().float()
    ckpt2 = params.S0.clone()
    y2 = ops.ssd_verify_store_states(ckpt2, states, counts, new.x, new.dt, params.A, new.B, new.C, params.D)
    assert rel_err(y2, y_ref) < 1e-2 and rel_err(ckpt2, folded) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_verify_step_replays_in_a_cuda_graph(kernels):
    """ops.ssd_verify_inplace + conv_verify_inplace captured once, replayed with new counts and
    inputs written into the captured tensors: every replay equals the reference."""
    b, h, n, p, c, K, T = 4, 8, 64, 64, 96, 4, 5
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(13)
    params = layer_params(h, n, p, b, dtype, "cuda", g)
    ckpt = params.S0.clone()
    x_cache = torch.zeros(b, T, h, p, dtype=dtype, device="cuda")
    dt_cache = torch.zeros(b, T, h, dtype=dtype, device="cuda")
    B_cache = torch.zeros(b, T, h, n, dtype=dtype, device="cuda")
    window = randn(b, K - 1 + T, c, g=g, dtype=dtype, device="cuda")
    w, bias = randn(c, K, g=g, dtype=dtype, device="cuda"), randn(c, g=g, dtype=dtype, device="cuda")
    counts = torch.zeros(b, dtype=torch.long, device="cuda")
    tok = new_tokens(b, T, h, n, p, dtype, "cuda", g)
    tok = SimpleNamespace(**{k: v.contiguous() for k, v in vars(tok).items()})
    xBC = randn(b, T, c, g=g, dtype=dtype, device="cuda")
    y_out, conv_out = torch.empty_like(tok.x), torch.empty_like(xBC)

    def step():
        ops.conv_verify_inplace(window, counts, xBC, w, bias, out=conv_out)
        ops.ssd_verify_inplace(
            ckpt, x_cache, dt_cache, B_cache, counts, tok.x, tok.dt, params.A, tok.B, tok.C, params.D, out=y_out
        )

    step()  # compiles, allocates the ticket buffer
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for round_ in range(4):
        new = new_tokens(b, T, h, n, p, dtype, "cuda", g)
        for k, v in vars(new).items():
            getattr(tok, k).copy_(v)
        xBC.copy_(randn(b, T, c, g=g, dtype=dtype, device="cuda"))
        counts.copy_(torch.tensor([0, T, 1, round_ + 1]))
        expect_y, expect_ckpt = ops.ssd_verify(
            *map(cpu64, (ckpt, x_cache, dt_cache, B_cache)), counts.cpu(),
            *map(cpu64, (tok.x, tok.dt, params.A, tok.B, tok.C, params.D)),
        )
        expect_conv, _ = ops.conv_verify(cpu64(window), counts.cpu(), cpu64(xBC), cpu64(w), cpu64(bias))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y_out, expect_y) < 1e-2 and rel_err(ckpt, expect_ckpt) < 1e-5
        assert rel_err(conv_out, expect_conv) < 1e-2
        assert torch.equal(x_cache, tok.x) and torch.equal(window[:, K - 1 :], xBC)
