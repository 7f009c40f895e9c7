"""GPU kernels (mambaify.ops.triton) and the ops-level decode/norm functions against the reference.

* The PyTorch paths of ops.ssd_step_inplace / conv_step_inplace / gated_rmsnorm: always.
* Our Triton kernels: compiled on CUDA (``gpu`` marker), else in Triton's interpreter on the CPU.
  Triton decides "interpret or compile" when a kernel (its own library's too) is decorated,
  i.e. at import, and the model stack imports triton early; so on a CPU machine
  :func:`test_kernels_in_triton_interpreter` reruns this file's ``interp`` cases in a
  subprocess started with TRITON_INTERPRET=1, and nothing leaks into other tests. Skipped where
  triton is not installed.
* The fla scan backend: ``gpu`` marker, skipped without CUDA or fla-core; forward and backward
  against the reference at bf16 tolerances.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mambaify import ops
from mambaify.models.modeling import GatedRMSNorm
from tests._triton_cases import (
    HAS_CUDA,
    INTERPRET,
    gpu,
    kernel_module,
    needs_triton,
    run_interpreter_cases,
)



def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error, computed in float64."""
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# Tolerances of a kernel's result against the float64 reference on the same (rounded) inputs.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def randn(*shape, g, dtype=torch.float64, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def step_inputs(b, h, n, p, dtype, device="cpu", seed=0):
    """One decode step's inputs in ``dtype``; the state as the cache keeps it (float32, or float64)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return SimpleNamespace(
        state=randn(b, h, n, p, g=g, dtype=wide, device=device),
        x=randn(b, h, p, g=g, dtype=dtype, device=device),
        dt=F.softplus(randn(b, h, g=g)).to(device, dtype),
        A=(-torch.rand(h, generator=g, dtype=torch.float64) * 2 - 0.1).to(device, wide),
        B=randn(b, h, n, g=g, dtype=dtype, device=device),
        C=randn(b, h, n, g=g, dtype=dtype, device=device),
        D=randn(h, g=g, dtype=dtype, device=device),
    )


def as64(ns: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(**{k: v.double().cpu() for k, v in vars(ns).items()})


# --------------------------------------------------------------------------- PyTorch paths


def test_ssd_step_inplace_torch_path():
    i = step_inputs(3, 5, 7, 9, torch.float64)
    y_ref, s_ref = ops.ssd_step(i.state, i.x, i.dt, i.A, i.B, i.C, i.D)
    state, out = i.state.clone(), torch.empty_like(i.x)
    ptr = state.data_ptr()
    y = ops.ssd_step_inplace(state, i.x, i.dt, i.A, i.B, i.C, i.D, out=out)
    assert y is out and state.data_ptr() == ptr
    assert torch.equal(y, y_ref) and torch.equal(state, s_ref)


@pytest.mark.parametrize("K", [1, 4])
def test_conv_step_inplace_torch_path(K):
    g = torch.Generator().manual_seed(1)
    x, w, bias = randn(2, 6, 11, g=g), randn(11, K, g=g), randn(11, g=g)
    s0 = randn(2, 11, K - 1, g=g)
    y_ref, s_ref = ops.causal_conv1d(x, w, bias, s0)
    state = s0.clone()
    for t in range(6):
        y = ops.conv_step_inplace(state, x[:, t], w, bias)
        assert (y - F.silu(y_ref[:, t])).abs().max() < 1e-12
    assert torch.equal(state, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_torch_path_is_the_module(dtype):
    g = torch.Generator().manual_seed(2)
    module = GatedRMSNorm(37, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(randn(37, g=g))
    y, z = randn(2, 3, 37, g=g, dtype=dtype), randn(2, 3, 37, g=g, dtype=dtype)
    out = ops.gated_rmsnorm(y, z, module.weight, 1e-5)
    assert out.dtype == module(y, z).dtype and torch.equal(out, module(y, z))


# --------------------------------------------------------------------------- our Triton kernels


@needs_triton
@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="kernels run compiled on CUDA / this is the subprocess")
def test_kernels_in_triton_interpreter():
    """The ``interp`` kernel cases below, in a fresh interpreter with TRITON_INTERPRET=1."""
    run_interpreter_cases(__file__, "interp", timeout=600)


@pytest.fixture
def kernels(request):
    """mambaify.ops.triton, compiled for CUDA or, in the subprocess above, interpreted."""
    return kernel_module(request, "mambaify.ops.triton")


# (device, dtype of the inputs): float64 and float32 in the interpreter, float32 and bf16 on CUDA.
KERNEL_CASES = [
    pytest.param("cpu", torch.float64, marks=needs_triton, id="interp-f64"),
    pytest.param("cpu", torch.float32, marks=needs_triton, id="interp-f32"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-f32"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
]


@needs_triton
def test_gemv_plan_splits_one_row_finely_and_several_rows_only_where_n_blocks_are_few(monkeypatch):
    """On the H200's 132 multiprocessors at the 8B shape (block 32 x 256): one row splits K for
    about four programs per multiprocessor; several rows (tl.dot) keep the split only for
    matrices of fewer n blocks than multiprocessors (k/v, o, down), the split measured faster
    there and slower for in_proj, gate+up and q+k+v as one."""
    from mambaify.ops.triton import gemv

    monkeypatch.setattr(gemv, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert gemv.plan(8480, 4096, cuda) == (265, 2)            # in_proj, one row
    assert gemv.plan(8480, 4096, cuda, dot=True) == (265, 1)  # in_proj, a verify call's rows
    assert gemv.plan(14336, 4096, cuda, dot=True) == (448, 1)
    assert gemv.plan(1024, 4096, cuda, dot=True) == gemv.plan(1024, 4096, cuda) == (32, 8)
    assert gemv.plan(4096, 14336, cuda, dot=True) == gemv.plan(4096, 14336, cuda) == (128, 5)
    # The launch configuration: K blocks of 128 for several rows with the K split (down, o), 256 otherwise.
    assert gemv.default_config(4, 4096, 14336, cuda) == gemv.default_config(4, 4096, 4096, cuda) == (32, 128, 4)
    assert gemv.default_config(4, 8480, 4096, cuda) == gemv.default_config(4, 14336, 4096, cuda) == (32, 256, 4)
    assert gemv.default_config(1, 4096, 14336, cuda) == gemv.default_config(1, 14336, 4096, cuda) == (32, 256, 4)
    # One row through gate and up together: K blocks of 128 (two tiles per K step), so that the
    # 896 programs fit one wave; several rows through the two keep the one-matrix choice.
    assert gemv.default_config(1, 14336, 4096, cuda, gated=True) == (32, 128, 4)
    assert gemv.default_config(4, 14336, 4096, cuda, gated=True) == (32, 256, 4)


@needs_triton
def test_gemv_config_forced_by_the_environment_and_refused_when_malformed(monkeypatch):
    """MAMBAIFY_GEMV_CONFIG overrides every default choice; a malformed value is refused with
    the expected form, not half-read."""
    from mambaify.ops.triton import gemv

    cuda = torch.device("cuda")
    monkeypatch.setattr(gemv, "_num_sms", lambda device: 132)
    monkeypatch.setenv("MAMBAIFY_GEMV_CONFIG", "64, 512, 8")
    assert gemv.forced_config() == (64, 512, 8)
    for m, gated in ((1, True), (1, False), (4, False)):
        assert gemv.default_config(m, 4096, 14336, cuda, gated=gated) == (64, 512, 8)
    for bad in ("32,256", "32,256,4,1", "a,b,c", "32,200,4", "32,256,64"):
        monkeypatch.setenv("MAMBAIFY_GEMV_CONFIG", bad)
        with pytest.raises(ValueError, match="MAMBAIFY_GEMV_CONFIG.*e.g. 32,256,4"):
            gemv.forced_config()
    monkeypatch.setenv("MAMBAIFY_GEMV_CONFIG", "")
    assert gemv.forced_config() is None
    assert gemv.default_config(1, 14336, 4096, cuda, gated=True) == gemv.GATED_ONE_ROW_CONFIG


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,n,k,block_k,bias", [
    (1, 37, 1000, 16, False),   # K split 8 ways, partial sums added after; odd N masked
    (3, 90, 1000, 16, True),    # several rows, fewer N blocks than SMs: split; bias after the sums
    (3, 300, 1000, 16, True),   # several rows, an N block per SM: one split
    (16, 33, 70, 256, True),    # one split: the kernel writes the result itself, K masked
    (5, 64, 96, 32, False),     # split into whole blocks, the last one short
])
def test_small_batch_linear_kernel(kernels, device, dtype, m, n, k, block_k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n)
    wide = randn(m, k + 3, g=g, dtype=dtype, device=device)
    x = wide[:, 2 : 2 + k]  # a strided view: rows of a wider tensor
    w = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    b = randn(n, g=g, dtype=dtype, device=device) if bias else None
    out = kernels.small_batch_linear(x, w, b, block_k=block_k)
    ref = F.linear(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu())
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # Fixed-order sums: the same inputs give the same bits, whichever split finishes last, and
    # the same as the split sums added by a kernel of their own.
    assert torch.equal(out, kernels.small_batch_linear(x, w, b, block_k=block_k))
    assert torch.equal(out, kernels.small_batch_linear(x, w, b, block_k=block_k, one_launch=False))
    counters = kernels.gemv._COUNTERS.get(torch.device(device))
    assert counters is None or not counters.any()  # every call leaves its counters at zero


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,n,k,block_k,splits", [
    (1, 37, 1000, 16, None),  # split as planned: both partial sums added up, then the gate
    (4, 300, 200, 32, 1),     # one split: the kernel applies the gate itself
    (3, 50, 640, 64, 3),      # a split count asked for
])
def test_small_batch_gated_up_kernel(kernels, device, dtype, m, n, k, block_k, splits):
    g = torch.Generator().manual_seed(m + n + k)
    x = randn(2, m, k, g=g, dtype=dtype, device=device)[1]  # the second of two row blocks
    gate = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    up = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    out = kernels.small_batch_gated_up(x, gate, up, block_k=block_k, splits=splits)
    x64, g64, u64 = (t.double().cpu() for t in (x, gate, up))
    ref = F.silu(F.linear(x64, g64)) * F.linear(x64, u64)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out, kernels.small_batch_gated_up(x, gate, up, block_k=block_k, splits=splits))
    assert torch.equal(out, kernels.small_batch_gated_up(x, gate, up, block_k=block_k, splits=splits, one_launch=False))
    # The same split counts through the plain linear.
    plain = kernels.small_batch_linear(x, gate, block_k=block_k, splits=splits)
    assert rel_err(plain, F.linear(x64, g64)) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,sizes,k,block_k,splits,biases", [
    (1, (40, 24, 24), 1000, 16, None, (False, False, False)),  # split: matrices not on block bounds
    (3, (64, 32, 32), 96, 32, None, (True, True, True)),        # several rows, a bias over all three
    (5, (33, 7, 7), 70, 256, 1, (True, False, True)),           # one split; one bias missing
])
def test_small_batch_qkv_kernel(kernels, device, dtype, m, sizes, k, block_k, splits, biases):
    """q, k and v in one launch: the three projections side by side, as three F.linear calls
    give them (float64 reference), block rows never shared between two matrices."""
    g = torch.Generator().manual_seed(sum(sizes) + k)
    x = randn(m, k, g=g, dtype=dtype, device=device)
    mats = [randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5) for n in sizes]
    bs = [randn(n, g=g, dtype=dtype, device=device) if has else None for n, has in zip(sizes, biases)]
    out = kernels.small_batch_qkv(x, *mats, *bs, block_k=block_k, splits=splits)
    ref = torch.cat([F.linear(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu())
                     for w, b in zip(mats, bs)], -1)
    assert out.shape == (m, sum(sizes)) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out, kernels.small_batch_qkv(x, *mats, *bs, block_k=block_k, splits=splits, one_launch=False))
    counters = kernels.gemv._COUNTERS.get(torch.device(device))
    assert counters is None or not counters.any()
    many = randn(20, k, g=g, dtype=dtype, device=device)  # past 16 rows: three F.linear calls
    assert torch.equal(kernels.small_batch_qkv(many, *mats, *bs),
                       torch.cat([F.linear(many, w, b) for w, b in zip(mats, bs)], -1))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.small_batch_qkv(x, mats[0], mats[1].t().contiguous().t(), mats[2])


def int8_rows(n: int, k: int, g: torch.Generator, device: str, dtype: torch.dtype):
    """A random int8 matrix over the whole range and its rows' scales (k ** -0.5 / 127 apart)."""
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    scale = ((torch.rand(n, generator=g, dtype=torch.float64) + 0.5) * k ** -0.5 / 127).to(device, dtype)
    return w, scale


def dequant64(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w.double().cpu() * scale.double().cpu()[:, None]


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,n,k,block_k,splits,one_launch", [
    (1, 37, 1000, 16, None, True),   # one row, split: each column's scale where the splits' sums meet
    (1, 37, 1000, 16, 3, False),     # ... added by the second kernel
    (3, 90, 1000, 16, None, True),   # several rows: int8 tiles converted for tl.dot
    (5, 33, 70, 256, 1, True),       # one split: the kernel scales its own sums
])
def test_int8_weights_with_row_scales(kernels, device, dtype, m, n, k, block_k, splits, one_launch):
    """Int8 matrices with a scale per row (a quantized draft's): every GEMV form equals the
    float64 product with the dequantized matrix, the norm, bias, residual and gate applied as
    for floating-point weights."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    x = randn(m, k, g=g, dtype=dtype, device=device, scale=30.0)
    norm_w = randn(k, g=g, dtype=dtype, device=device)
    (w, sw), (up, su) = int8_rows(n, k, g, device, dtype), int8_rows(n, k, g, device, dtype)
    b = randn(n, g=g, dtype=dtype, device=device)
    res = randn(m, n, g=g, dtype=dtype, device=device)
    conf = dict(block_k=block_k, splits=splits, one_launch=one_launch)
    w64, up64 = dequant64(w, sw), dequant64(up, su)
    out = kernels.small_batch_linear(x, w, b, weight_scale=sw, **conf)
    assert out.dtype == dtype and rel_err(out, F.linear(x.double().cpu(), w64, b.double().cpu())) < TOL[dtype]
    out = kernels.small_batch_linear(x, w, b, weight_scale=sw, norm_weight=norm_w, norm_eps=1e-5, residual=res, **conf)
    normed = rms64(x, norm_w, 1e-5)
    assert rel_err(out, F.linear(normed, w64, b.double().cpu()) + res.double().cpu()) < TOL[dtype]
    gated = kernels.small_batch_gated_up(x, w, up, norm_weight=norm_w, norm_eps=1e-5, gate_scale=sw, up_scale=su,
                                         **conf)
    assert rel_err(gated, F.silu(F.linear(normed, w64)) * F.linear(normed, up64)) < TOL[dtype]
    small, s_small = int8_rows(7, k, g, device, dtype)
    qkv = kernels.small_batch_qkv(x, w, small, small, weight_scale=torch.cat([sw, s_small, s_small]), **conf)
    expected = torch.cat([F.linear(x.double().cpu(), t) for t in (w64, *[dequant64(small, s_small)] * 2)], -1)
    assert rel_err(qkv, expected) < TOL[dtype]
    h, scaled, parts = kernels.small_batch_linear_prepare_norm(x, w, b, res, randn(n, g=g, dtype=dtype, device=device),
                                                               one_launch=one_launch, weight_scale=sw)
    assert rel_err(h, F.linear(x.double().cpu(), w64, b.double().cpu()) + res.double().cpu()) < TOL[dtype]
    # The same bits whichever kernel adds the splits, and the PyTorch form past 16 rows.
    assert torch.equal(kernels.small_batch_linear(x, w, b, weight_scale=sw, **{**conf, "one_launch": True}),
                       kernels.small_batch_linear(x, w, b, weight_scale=sw, **{**conf, "one_launch": False}))
    many = randn(20, k, g=g, dtype=dtype, device=device)
    assert rel_err(kernels.small_batch_linear(many, w, b, weight_scale=sw),
                   F.linear(many.double().cpu(), w64, b.double().cpu())) < TOL[dtype]
    with pytest.raises(ValueError, match="int8 weights need weight_scale"):
        kernels.small_batch_linear(x, w, b)
    with pytest.raises(ValueError, match="int8 weights need weight_scale"):
        kernels.small_batch_linear(x, w.to(dtype), b, weight_scale=sw)
    with pytest.raises(ValueError, match=f"expected \\({n},\\) floating point"):
        kernels.small_batch_linear(x, w, b, weight_scale=sw[:-1])
    with pytest.raises(ValueError, match="must be alike"):
        kernels.small_batch_gated_up(x, w, up.to(dtype), gate_scale=sw)
    counters = kernels.gemv._COUNTERS.get(torch.device(device))
    assert counters is None or not counters.any()


def rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double().cpu(), weight.double().cpu()
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,n,k,block_k,splits,one_launch", [
    (1, 37, 1000, 16, None, True),   # one row, split as planned: the scale where the splits' sums meet
    (1, 37, 1000, 16, 3, False),     # ... added by the second kernel
    (3, 90, 1000, 16, None, True),   # several rows through tl.dot, split
    (3, 50, 640, 64, 3, False),
    (5, 33, 70, 256, 1, True),       # one split: the kernel scales its own sums
])
def test_small_batch_linear_folds_the_rmsnorm_before_and_the_residual_after(kernels, device, dtype, m, n, k,
                                                                             block_k, splits, one_launch):
    """``rms_norm(x) @ W^T + b + residual`` in one launch, equal to the float64 reference; the
    RMSNorm's input ``x`` is large (a residual stream's scale), so an unapplied scale shows."""
    g = torch.Generator().manual_seed(m * 100 + n + k)
    x = randn(m, k, g=g, dtype=dtype, device=device, scale=30.0)
    norm_w = randn(k, g=g, dtype=dtype, device=device)
    w = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    b = randn(n, g=g, dtype=dtype, device=device)
    res = randn(m, n, g=g, dtype=dtype, device=device)
    out = kernels.small_batch_linear(x, w, b, block_k=block_k, splits=splits, one_launch=one_launch,
                                     norm_weight=norm_w, norm_eps=1e-5, residual=res)
    ref = F.linear(rms64(x, norm_w, 1e-5), w.double().cpu(), b.double().cpu()) + res.double().cpu()
    assert out.shape == (m, n) and out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    # Gate and up, and q/k/v, fold their layer's norm the same way.
    up = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    gated = kernels.small_batch_gated_up(x, w, up, block_k=block_k, splits=splits, one_launch=one_launch,
                                         norm_weight=norm_w, norm_eps=1e-5)
    normed = rms64(x, norm_w, 1e-5)
    assert rel_err(gated, F.silu(F.linear(normed, w.double().cpu())) * F.linear(normed, up.double().cpu())) < TOL[dtype]
    qkv = kernels.small_batch_qkv(x, w, up, up, block_k=block_k, splits=splits, one_launch=one_launch,
                                  norm_weight=norm_w, norm_eps=1e-5)
    expected = torch.cat([F.linear(normed, t.double().cpu()) for t in (w, up, up)], -1)
    assert rel_err(qkv, expected) < TOL[dtype]
    counters = kernels.gemv._COUNTERS.get(torch.device(device))
    assert counters is None or not counters.any()


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,k,splits,one_launch", [
    (3, 1000, None, True),   # several rows: the producer split, its last split prepares
    (3, 1000, None, False),  # ... or the split sums' own kernel does, in blocks of its own
    (4, 96, 1, True),        # one split: the producer's launch prepares as it writes
    (1, 1000, None, True),   # one row (the engines prepare only several; the kernel takes any)
])
def test_prepared_norm_between_two_gemvs_equals_the_norm_in_between(kernels, device, dtype, m, k, splits,
                                                                     one_launch):
    """The producer (a residual-add GEMV) leaves h = residual + x W^T, h times the next norm's
    weight and h's sums of squares by blocks of columns; the consumers (one matrix, gate and up,
    q/k/v) read h * g as a plain operand and scale their sums from the blocks: the same as the
    RMSNorm run between them (float64 reference), the producer's parts a partition of each
    row's sum, and the launch's block count the one prepared_blocks predicts."""
    g = torch.Generator().manual_seed(m * 10 + k)
    n, n2 = 300, 90  # the stream's width (the producer's N = the consumers' K), the consumers' N
    x = randn(m, k, g=g, dtype=dtype, device=device)
    w = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    b = randn(n, g=g, dtype=dtype, device=device)
    res = randn(m, n, g=g, dtype=dtype, device=device, scale=30.0)  # a residual stream's scale
    norm_w = randn(n, g=g, dtype=dtype, device=device)
    h, scaled, parts = kernels.small_batch_linear_prepare_norm(x, w, b, res, norm_w, one_launch=one_launch)
    h_ref = F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu()) + res.double().cpu()
    assert h.shape == scaled.shape == (m, n) and h.dtype == scaled.dtype == dtype
    assert rel_err(h, h_ref) < TOL[dtype]
    # Of h as stored (rounded to its dtype), as the norm would read it.
    assert rel_err(scaled, h.double().cpu() * norm_w.double().cpu()) < TOL[dtype]
    assert parts.dim() == 2 and parts.shape[1] == m
    assert rel_err(parts.sum(0), h.double().cpu().pow(2).sum(-1)) < TOL[dtype]
    assert parts.shape[0] == kernels.gemv.prepared_blocks(m, n, k, h.device, one_launch)
    normed = rms64(h, norm_w, 1e-5)
    w2, up = (randn(n2, n, g=g, dtype=dtype, device=device, scale=n ** -0.5) for _ in range(2))
    b2 = randn(n2, g=g, dtype=dtype, device=device)
    for split in (None, 1):
        out = kernels.small_batch_linear(scaled, w2, b2, norm_parts=parts, norm_eps=1e-5, splits=split,
                                         one_launch=one_launch)
        assert rel_err(out, F.linear(normed, w2.double().cpu(), b2.double().cpu())) < TOL[dtype]
    gated = kernels.small_batch_gated_up(scaled, w2, up, norm_parts=parts, norm_eps=1e-5, one_launch=one_launch)
    assert rel_err(gated, F.silu(F.linear(normed, w2.double().cpu())) * F.linear(normed, up.double().cpu())) < TOL[dtype]
    qkv = kernels.small_batch_qkv(scaled, w2, up, up, norm_parts=parts, norm_eps=1e-5, one_launch=one_launch)
    assert rel_err(qkv, torch.cat([F.linear(normed, t.double().cpu()) for t in (w2, up, up)], -1)) < TOL[dtype]
    with pytest.raises(ValueError, match="not both"):
        kernels.small_batch_linear(scaled, w2, norm_weight=norm_w, norm_parts=parts)
    with pytest.raises(ValueError, match="expected \\(blocks, "):
        kernels.small_batch_linear(scaled, w2, norm_parts=parts[:, :1] if m > 1 else parts.T)
    counters = kernels.gemv._COUNTERS.get(torch.device(device))
    assert counters is None or not counters.any()


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("m,splits,one_launch", [(1, None, True), (1, 3, False), (3, None, True), (4, 1, True)])
def test_small_batch_linear_folds_mamba2s_gated_rmsnorm(kernels, device, dtype, m, splits, one_launch):
    """out_proj(gated_rmsnorm(y, z)) + residual in one launch (z a strided view, as the mixer's
    in_proj output gives it), equal to the float64 reference."""
    g = torch.Generator().manual_seed(m + 7)
    k, n = 600, 70
    y = randn(m, k, g=g, dtype=dtype, device=device, scale=4.0)
    z = randn(m, k + 5, g=g, dtype=dtype, device=device)[:, 3 : 3 + k]
    norm_w = randn(k, g=g, dtype=dtype, device=device)
    w = randn(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    res = randn(m, n, g=g, dtype=dtype, device=device)
    out = kernels.small_batch_linear(y, w, block_k=32, splits=splits, one_launch=one_launch, norm_weight=norm_w,
                                     norm_eps=1e-5, residual=res, gate=z)
    y64, z64 = y.double().cpu(), z.double().cpu()
    h = y64 * F.silu(z64)
    normed = norm_w.double().cpu() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(out, F.linear(normed, w.double().cpu()) + res.double().cpu()) < TOL[dtype]
    with pytest.raises(ValueError, match="gate"):
        kernels.small_batch_linear(y, w, gate=z)  # a gate without the norm it gates


@pytest.mark.parametrize("device,dtype", KERNEL_CASES[:1] + KERNEL_CASES[2:3])
def test_small_batch_linear_fused_operands_past_16_rows_and_bad_shapes(kernels, device, dtype):
    """More rows than the kernel takes: the same result through PyTorch, the norm as the Llama
    family computes it; a norm weight or residual of the wrong size is refused by name."""
    g = torch.Generator().manual_seed(3)
    x = randn(2, 10, 64, g=g, dtype=dtype, device=device)  # 20 rows
    norm_w, w = randn(64, g=g, dtype=dtype, device=device), randn(24, 64, g=g, dtype=dtype, device=device)
    res = randn(2, 10, 24, g=g, dtype=dtype, device=device)
    got = kernels.small_batch_linear(x, w, norm_weight=norm_w, norm_eps=1e-6, residual=res)
    assert torch.equal(got, res + F.linear(ops.rms_norm(x, norm_w, 1e-6), w))
    assert torch.equal(kernels.small_batch_gated_up(x, w, w, norm_weight=norm_w, norm_eps=1e-6),
                       F.silu(F.linear(ops.rms_norm(x, norm_w, 1e-6), w)) * F.linear(ops.rms_norm(x, norm_w, 1e-6), w))
    with pytest.raises(ValueError, match="norm_weight"):
        kernels.small_batch_linear(x, w, norm_weight=norm_w[:-1])
    with pytest.raises(ValueError, match="residual"):
        kernels.small_batch_linear(x[0, :2], w, residual=res[0])


@pytest.mark.parametrize("device,dtype", KERNEL_CASES[:1] + KERNEL_CASES[2:3])
def test_small_batch_linear_split_sums_switch_and_counter_limit(kernels, device, dtype, monkeypatch):
    """MAMBAIFY_GEMV_ONE_LAUNCH=0 sends the split sums to their own kernel (the same bits); more n
    blocks than the counters cover is refused with the way out named."""
    g = torch.Generator().manual_seed(11)
    x = randn(2, 512, g=g, dtype=dtype, device=device)
    w = randn(96, 512, g=g, dtype=dtype, device=device, scale=512 ** -0.5)
    gemv = kernels.gemv
    one = gemv.small_batch_linear(x, w, block_k=32, splits=4)
    launches = []
    real = gemv._sum_splits_kernel
    monkeypatch.setattr(gemv, "_sum_splits_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    monkeypatch.setenv("MAMBAIFY_GEMV_ONE_LAUNCH", "0")
    assert not gemv.one_launch_default()
    assert torch.equal(gemv.small_batch_linear(x, w, block_k=32, splits=4), one) and len(launches) == 1
    monkeypatch.delenv("MAMBAIFY_GEMV_ONE_LAUNCH")
    assert gemv.one_launch_default()
    assert torch.equal(gemv.small_batch_linear(x, w, block_k=32, splits=4), one) and len(launches) == 1
    monkeypatch.setattr(gemv, "MAX_PROGRAMS_N", 2)
    with pytest.raises(ValueError, match="one_launch=False"):
        gemv.small_batch_linear(x, w, block_k=32, splits=4)  # 3 blocks of 32 along N
    assert torch.equal(gemv.small_batch_linear(x, w, block_k=32, splits=4, one_launch=False), one)


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_small_batch_linear_pipelined_one_row_loop_gives_the_same_bits(kernels, device, dtype, monkeypatch):
    """MAMBAIFY_GEMV_STAGES=3 or 4 pipelines the one-row loop (compiled: the next weight tiles
    stream into shared memory while the current one is reduced; 2 routes them through shared
    memory without overlap) and changes no sum's order: the
    same bits as the loop without, for a split call, gate and up read together, and the gated
    norm and residual folded in. Several rows keep Triton's pipelining of their tl.dot loop
    whatever the switch says; a malformed value is refused."""
    g = torch.Generator().manual_seed(12)
    gemv = kernels.gemv
    x, z = randn(1, 640, g=g, dtype=dtype, device=device), randn(1, 640, g=g, dtype=dtype, device=device)
    rows = randn(3, 640, g=g, dtype=dtype, device=device)
    w, w2 = (randn(96, 640, g=g, dtype=dtype, device=device, scale=640 ** -0.5) for _ in range(2))
    norm_weight, res = randn(640, g=g, dtype=dtype, device=device), randn(1, 96, g=g, dtype=dtype, device=device)
    calls = {
        "split": lambda: gemv.small_batch_linear(x, w, block_k=64),
        "gated": lambda: gemv.small_batch_gated_up(x, w, w2, block_k=32, splits=2),
        "gated norm, residual": lambda: gemv.small_batch_linear(x, w, block_k=64, norm_weight=norm_weight,
                                                                residual=res, gate=z),
        "rows": lambda: gemv.small_batch_linear(rows, w, block_k=64),
    }
    launched = []
    real = gemv._gemv_kernel
    monkeypatch.setattr(gemv, "_gemv_kernel", type("Recorded", (), {"__getitem__": lambda self, grid: (
        lambda *args, **kwargs: launched.append(kwargs["STAGES"]) or real[grid](*args, **kwargs))})())
    monkeypatch.delenv("MAMBAIFY_GEMV_STAGES", raising=False)
    plain = {name: call() for name, call in calls.items()}
    assert launched == [gemv.ONE_ROW_STAGES] * 3 + [gemv.DOT_STAGES]
    for stages in (2, 3, 4):
        launched.clear()
        monkeypatch.setenv("MAMBAIFY_GEMV_STAGES", str(stages))
        for name, call in calls.items():
            assert torch.equal(call(), plain[name]), (name, stages)
        assert launched == [stages] * 3 + [gemv.DOT_STAGES]
    launched.clear()  # a call's own stages outrank the switch
    assert torch.equal(gemv.small_batch_linear(x, w, block_k=64, stages=1), plain["split"]) and launched == [1]
    with pytest.raises(ValueError, match="stages=0: give the one-row GEMV's pipeline stages"):
        gemv.small_batch_linear(x, w, stages=0)
    for bad in ("0", "5", "two"):
        monkeypatch.setenv("MAMBAIFY_GEMV_STAGES", bad)
        with pytest.raises(ValueError, match="MAMBAIFY_GEMV_STAGES.*1 \\(none\\) to 4"):
            calls["split"]()


@pytest.mark.parametrize("device,dtype", KERNEL_CASES[:1] + KERNEL_CASES[2:3])
def test_small_batch_linear_tuning_times_each_configuration_once_and_keeps_the_fastest(kernels, device, dtype,
                                                                                        monkeypatch):
    """MAMBAIFY_GEMV_TUNE=1: a shape's first call times every configuration and launches the
    fastest; later calls of the shape reuse it without timing; an explicit configuration is
    never tuned. In the interpreter the timings are made up (one configuration said fastest);
    on a GPU they are real."""
    gemv = kernels.gemv
    monkeypatch.setenv("MAMBAIFY_GEMV_TUNE", "1")
    monkeypatch.setattr(gemv, "_TUNED", {})
    timed = []
    if device == "cpu":
        fastest = (16, 512, 8)
        monkeypatch.setattr(gemv, "_can_time", lambda device: True)
        monkeypatch.setattr(gemv, "_time_config", lambda config, run: timed.append(config) or (config != fastest) + 1.0)
    else:
        real_time = gemv._time_config
        monkeypatch.setattr(gemv, "_time_config", lambda config, run: timed.append(config) or real_time(config, run))
    g = torch.Generator().manual_seed(12)
    x = randn(2, 600, g=g, dtype=dtype, device=device)
    w = randn(80, 600, g=g, dtype=dtype, device=device, scale=600 ** -0.5)
    launched = []  # the configuration of every launch, timed or not
    real_kernel = gemv._gemv_kernel

    def launch(grid):
        def run(*args, **meta):
            launched.append((meta["BLOCK_N"], meta["BLOCK_K"], meta["num_warps"]))
            return real_kernel[grid](*args, **meta)
        return run
    monkeypatch.setattr(gemv, "_gemv_kernel", type("Recorded", (), {"__getitem__": lambda self, grid: launch(grid)})())
    out = gemv.small_batch_linear(x, w)
    assert sorted(timed) == sorted(gemv.TUNE_CONFIGS)
    (chosen,) = gemv._TUNED.values()
    assert launched[-1] == chosen  # the call itself, after the timings
    if device == "cpu":
        assert chosen == fastest
    explicit = dict(zip(("block_n", "block_k", "num_warps"), chosen))
    assert torch.equal(out, gemv.small_batch_linear(x, w, **explicit))  # launched with the chosen one
    assert rel_err(out, F.linear(x.double().cpu(), w.double().cpu())) < TOL[dtype]
    gemv.small_batch_linear(x, w)
    gemv.small_batch_linear(x, w, block_n=32, block_k=256, num_warps=4)
    assert len(timed) == len(gemv.TUNE_CONFIGS)  # neither the same shape again nor an explicit configuration
    monkeypatch.setenv("MAMBAIFY_GEMV_TUNE", "0")
    gemv.small_batch_linear(x[:1], w)
    assert len(gemv._TUNED) == 1


@pytest.mark.parametrize("device,dtype", KERNEL_CASES[:1] + KERNEL_CASES[2:3])
def test_small_batch_linear_takes_leading_dims_and_hands_big_batches_to_cublas(kernels, device, dtype):
    g = torch.Generator().manual_seed(9)
    w = randn(24, 40, g=g, dtype=dtype, device=device)
    x = randn(2, 3, 40, g=g, dtype=dtype, device=device)
    out = kernels.small_batch_linear(x, w)
    assert out.shape == (2, 3, 24) and rel_err(out, F.linear(x.double(), w.double())) < TOL[dtype]
    many = randn(kernels.gemv.MAX_ROWS + 1, 40, g=g, dtype=dtype, device=device)
    assert torch.equal(kernels.small_batch_linear(many, w), F.linear(many, w))
    with pytest.raises(ValueError, match="40 features"):
        kernels.small_batch_linear(x, w[:, :39])
    gated = kernels.small_batch_gated_up(many, w, w.flip(0))
    assert rel_err(gated, F.silu(F.linear(many.double(), w.double())) * F.linear(many.double(), w.flip(0).double())) \
        < TOL[dtype]
    with pytest.raises(ValueError, match="differ"):
        kernels.small_batch_gated_up(x, w, w[:20])


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("with_D", [True, False])
def test_ssd_step_kernel(kernels, device, dtype, with_D):
    b, h, n, p, steps = 3, 6, 7, 37, 3  # odd sizes: masks on n and p, p split over programs on CUDA
    i = step_inputs(b, h, n, p, dtype, device)
    # Strided inputs as the engine may pass them: B shared by all heads (a stride-0 view, as
    # with one kv head), x a slice of a wider tensor.
    B_view = i.B[:, :1].expand(b, h, n)
    x_view = torch.cat([i.x, i.x[..., :5]], dim=-1)[..., :p]
    i.B = B_view.contiguous()
    ref = as64(i)
    D, D64 = (i.D, ref.D) if with_D else (None, None)
    state_tol = 1e-12 if dtype == torch.float64 else 1e-5  # the state is float32 (or float64)
    state, state64 = i.state.clone(), ref.state
    for _ in range(steps):  # state carried across steps, as in decoding
        y = kernels.ssd_step_inplace(state, x_view, i.dt, i.A, B_view, i.C, D)
        y64, state64 = ops.ssd_step(state64, ref.x, ref.dt, ref.A, ref.B, ref.C, D64)
        assert y.dtype == i.x.dtype
        assert rel_err(y, y64) < TOL[dtype]
        assert rel_err(state, state64) < state_tol
    # The functional form leaves its input state alone and returns the new one.
    before = state.clone()
    y2, new_state = kernels.ssd_step(state, i.x, i.dt, i.A, i.B, i.C, D)
    assert torch.equal(state, before)
    y64, s64 = ops.ssd_step(state64, ref.x, ref.dt, ref.A, ref.B, ref.C, D64)
    assert rel_err(y2, y64) < TOL[dtype] and rel_err(new_state, s64) < state_tol


def grouped_step_inputs(b, groups, rep, n, p, dtype, device="cpu", seed=0):
    """A step whose x and B come per group of ``rep`` heads and whose dt is the raw projection
    (the engine's Mamba decode step), and the same step spelled out per head, dt softplus-ed."""
    g = torch.Generator().manual_seed(seed)
    h = groups * rep
    i = step_inputs(b, h, n, p, dtype, device, seed)
    i.x, i.B = randn(b, groups, p, g=g, dtype=dtype, device=device), randn(b, groups, n, g=g, dtype=dtype, device=device)
    i.dt, i.dt_bias = randn(b, h, g=g, dtype=dtype, device=device), randn(h, g=g, dtype=dtype, device=device)
    i.dt[0, 0] = 30.0  # above softplus's threshold: taken as is
    ref = as64(i)
    ref.x, ref.B = ref.x.repeat_interleave(rep, dim=1), ref.B.repeat_interleave(rep, dim=1)
    # softplus(dt + dt_bias) in dt's dtype, as PyTorch (and the kernel) computes it: in bf16 the
    # rounded sum differs from the exact one by up to half an ulp, far above the state tolerance.
    ref.dt = F.softplus(i.dt + i.dt_bias).double().cpu()
    return i, ref


def test_ssd_step_inplace_torch_path_reads_head_groups_and_raw_dt():
    i, ref = grouped_step_inputs(2, 3, 4, 5, 6, torch.float64)
    state = i.state.clone()
    y = ops.ssd_step_inplace(state, i.x, i.dt, i.A, i.B, i.C, i.D, dt_bias=i.dt_bias)
    y64, s64 = ops.ssd_step(ref.state, ref.x, ref.dt, ref.A, ref.B, ref.C, ref.D)
    assert y.shape == (2, 12, 6) and torch.allclose(y, y64, rtol=1e-12) and torch.allclose(state, s64, rtol=1e-12)


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_ssd_step_kernel_reads_head_groups_and_raw_dt(kernels, device, dtype):
    """x and B per group of heads (read where each head's group is, not repeated), dt raw with
    the softplus of dt + dt_bias in the kernel, over two steps; equal to the float64 reference
    spelled out per head."""
    i, ref = grouped_step_inputs(3, 2, 3, 7, 37, dtype, device, seed=5)
    state, state64 = i.state.clone(), ref.state
    state_tol = 1e-12 if dtype == torch.float64 else 1e-5
    out = torch.empty(3, 6, 37, dtype=dtype, device=device)
    for _ in range(2):
        y = kernels.ssd_step_inplace(state, i.x, i.dt, i.A, i.B, i.C, i.D, out=out, dt_bias=i.dt_bias)
        y64, state64 = ops.ssd_step(state64, ref.x, ref.dt, ref.A, ref.B, ref.C, ref.D)
        assert y is out and rel_err(y, y64) < TOL[dtype] and rel_err(state, state64) < state_tol
    with pytest.raises(ValueError, match="groups of heads that divide h"):
        kernels.ssd_step_inplace(state, i.x[:, :1].expand(3, 4, 37), i.dt, i.A, i.B, i.C)


def conv_ssd_inputs(b, groups, h, n, p, K, dtype, device="cpu", seed=0):
    """A Mamba2 decode token as in_proj gives it: raw xBC (x per group, B per group, C per
    head), dt raw with its bias, the conv's weight and bias, the SSM state and a conv window."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    gx, gb, gc = groups
    d = gx * p + (gb + gc) * n
    return SimpleNamespace(
        state=randn(b, h, n, p, g=g, dtype=wide, device=device),
        window=randn(b, d, K - 1, g=g, dtype=dtype, device=device),
        xBC=[randn(b, d + 3, g=g, dtype=dtype, device=device)[:, 1 : d + 1] for _ in range(3)],  # strided, 3 tokens
        conv_weight=randn(d, K, g=g, dtype=dtype, device=device, scale=0.5),
        conv_bias=randn(d, g=g, dtype=dtype, device=device),
        dt=[randn(b, h, g=g, dtype=dtype, device=device) for _ in range(3)],
        dt_bias=randn(h, g=g, dtype=dtype, device=device),
        A=(-torch.rand(h, generator=g, dtype=torch.float64) * 2 - 0.1).to(device, wide),
        D=randn(h, g=g, dtype=dtype, device=device),
    )


def unfused_conv_ssd_steps(i, groups, first_slot):
    """The reference: float64, the conv step then the SSD step, three tokens from ``first_slot``;
    per token its y and the window (in the buffer the fused step leaves it in)."""
    state, window = i.state.double().cpu().clone(), i.window.double().cpu().clone()
    (gx, gb, gc), (n, p) = groups, state.shape[2:]
    out = []
    for t in range(3):
        act = ops.conv_step_inplace(window, i.xBC[t].double().cpu(), i.conv_weight.double().cpu(),
                                    i.conv_bias.double().cpu())
        x, B, C = act.split([gx * p, gb * n, gc * n], dim=-1)
        y = ops.ssd_step_inplace(state, x.unflatten(-1, (gx, p)), i.dt[t].double().cpu(), i.A.double().cpu(),
                                 B.unflatten(-1, (gb, n)), C.unflatten(-1, (gc, n)), i.D.double().cpu(),
                                 dt_bias=i.dt_bias.double().cpu())
        out.append((y, window.clone(), (first_slot + t + 1) % 2))
    return out, state


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("first_slot", [5, 8])
def test_conv_ssd_step_kernel_equals_the_conv_step_then_the_ssd_step(kernels, device, dtype, first_slot):
    """The conv and SSD steps in one launch over three tokens, x and B per group of 3 heads, C per
    head, p split into blocks: each token's y, the state, and the window left in the buffer the
    next token reads, equal to the float64 reference of the two steps apart."""
    groups, (b, h, n, p, K) = (2, 2, 6), (3, 6, 7, 37, 4)
    i = conv_ssd_inputs(b, groups, h, n, p, K, dtype, device, seed=first_slot)
    expected, state64 = unfused_conv_ssd_steps(i, groups, first_slot)
    windows = torch.zeros(2, *i.window.shape, dtype=dtype, device=device)
    windows[first_slot % 2] = i.window
    state, out = i.state.clone(), torch.empty(b, h, p, dtype=dtype, device=device)
    for t, (y64, window64, written) in enumerate(expected):
        slot = torch.tensor([first_slot + t], device=device)
        y = kernels.conv_ssd_step_inplace(state, windows, slot, i.xBC[t], i.conv_weight, i.conv_bias, groups,
                                          i.dt[t], i.A, i.D, i.dt_bias, out=out)
        assert y is out and rel_err(y, y64) < TOL[dtype], f"token {t}"
        # The window moves over bit for bit (the raw inputs, copied).
        assert torch.equal(windows[written].double().cpu(), window64), f"token {t}"
    assert rel_err(state, state64) < TOL[dtype]
    with pytest.raises(ValueError, match="conv_ssd_step shapes"):
        kernels.conv_ssd_step_inplace(state, windows[:, :, :-1], slot, i.xBC[0], i.conv_weight, i.conv_bias, groups,
                                      i.dt[0], i.A)


def test_conv_ssd_step_torch_path_is_the_two_steps():
    groups, (b, h, n, p, K) = (3, 1, 6), (2, 6, 5, 4, 4)
    i = conv_ssd_inputs(b, groups, h, n, p, K, torch.float64, seed=2)
    expected, state64 = unfused_conv_ssd_steps(i, groups, 3)
    windows = torch.zeros(2, *i.window.shape, dtype=torch.float64)
    windows[1] = i.window
    state = i.state.clone()
    for t, (y64, window64, written) in enumerate(expected):
        y = ops.conv_ssd_step_inplace(state, windows, torch.tensor([3 + t]), i.xBC[t], i.conv_weight, i.conv_bias,
                                      groups, i.dt[t], i.A, i.D, i.dt_bias)
        assert torch.equal(y, y64) and torch.equal(windows[written], window64)
    assert torch.equal(state, state64)
    # The op the compiled decode step calls: its schema, fake tensor and mutations check out.
    torch.library.opcheck(torch.ops.mambaify.conv_ssd_step_inplace.default, (
        state, windows, torch.tensor([6]), i.xBC[0], i.conv_weight, i.conv_bias, list(groups), i.dt[0], i.A, i.D,
        i.dt_bias, torch.empty(b, h, p, dtype=torch.float64)))


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_ssd_step_kernel_writes_in_place(kernels, device, dtype):
    i = step_inputs(2, 3, 16, 8, dtype, device, seed=3)
    state, out = i.state.clone(), torch.empty_like(i.x)
    ptrs = (state.data_ptr(), out.data_ptr())
    y = kernels.ssd_step_inplace(state, i.x, i.dt, i.A, i.B, i.C, i.D, out=out)
    assert y is out and (state.data_ptr(), out.data_ptr()) == ptrs
    assert not torch.equal(state, i.state)


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
@pytest.mark.parametrize("K,bias,silu", [(4, True, True), (4, False, False), (2, True, True), (1, True, True)])
def test_conv_step_kernel(kernels, device, dtype, K, bias, silu):
    g = torch.Generator().manual_seed(4)
    b, t, d = 3, 5, 300  # d > 256: more than one channel block
    x = randn(b, t, d, g=g, dtype=dtype, device=device)
    w = randn(d, K, g=g, dtype=dtype, device=device)
    bias_ = randn(d, g=g, dtype=dtype, device=device) if bias else None
    s0 = randn(b, d, K - 1, g=g, dtype=dtype, device=device)
    cpu64 = lambda v: v.double().cpu() if v is not None else None  # noqa: E731
    y64, s64 = ops.causal_conv1d(cpu64(x), cpu64(w), cpu64(bias_), cpu64(s0))
    if silu:
        y64 = F.silu(y64)
    state = s0.clone()
    for i in range(t):
        y = kernels.conv_step_inplace(state, x[:, i], w, bias_, silu)
        assert y.dtype == dtype
        assert rel_err(y, y64[:, i]) < TOL[dtype]
    # The state is the last K-1 inputs, copied bit for bit.
    assert torch.equal(state.double().cpu(), s64)


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_gated_rmsnorm_kernel_forward_backward(kernels, device, dtype):
    g = torch.Generator().manual_seed(5)
    N = 37  # odd width: masked columns must not enter the mean
    module = GatedRMSNorm(N, eps=1e-5).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        module.weight.copy_(randn(N, g=g))
    y = randn(2, 5, N, g=g, dtype=dtype, device=device).requires_grad_(True)
    # z as the mixer's split of in_proj's output: rows strided, not contiguous.
    zw = randn(2, 5, N + 11, g=g, dtype=dtype, device=device).requires_grad_(True)
    z = zw[..., 3 : 3 + N]
    out = kernels.gated_rmsnorm(y, z, module.weight, 1e-5)
    expected = module(y, z)
    assert out.dtype == expected.dtype
    assert rel_err(out, expected) < TOL[dtype]

    dout = randn(*out.shape, g=g, dtype=out.dtype, device=device)
    grads = torch.autograd.grad(out, (y, zw, module.weight), dout)
    # The reference gradients in float64 from the same rounded inputs (bf16 rounding inside the
    # module's forward is no function of the inputs to differentiate through).
    y64, zw64 = y.detach().double().requires_grad_(True), zw.detach().double().requires_grad_(True)
    w64 = module.weight.detach().double().requires_grad_(True)
    ref = GatedRMSNorm(N, eps=1e-5).double()
    ref.weight = torch.nn.Parameter(w64)
    expected_grads = torch.autograd.grad(ref(y64, zw64[..., 3 : 3 + N]), (y64, zw64, ref.weight), dout.double())
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype] * 10)
    assert (grads[1][..., :3] == 0).all() and (grads[1][..., 3 + N :] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_ops_dispatch_to_kernels_on_cuda_and_graph_capture(kernels):
    """ops.* pick the kernels for CUDA tensors, and a decode step of them replays in a CUDA graph."""
    b, h, n, p, d, K = 4, 8, 64, 64, 96, 4
    i = step_inputs(b, h, n, p, torch.bfloat16, "cuda", seed=6)
    g = torch.Generator().manual_seed(7)
    xc = randn(b, d, g=g, dtype=torch.bfloat16, device="cuda")
    w = randn(d, K, g=g, dtype=torch.bfloat16, device="cuda")
    s0_conv = randn(b, d, K - 1, g=g, dtype=torch.bfloat16, device="cuda")
    state, conv_state = i.state.clone(), s0_conv.clone()
    y_out, c_out = torch.empty_like(i.x), torch.empty_like(xc)

    def step():
        ops.conv_step_inplace(conv_state, xc, w, None, True, out=c_out)
        ops.ssd_step_inplace(state, i.x, i.dt, i.A, i.B, i.C, i.D, out=y_out)

    step()  # compiles the kernels outside the capture
    state.copy_(i.state)
    conv_state.copy_(s0_conv)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    state.copy_(i.state)
    conv_state.copy_(s0_conv)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()

    ref, s64, cs64 = as64(i), i.state.double().cpu(), s0_conv.double().cpu()
    for _ in range(2):
        y64, s64 = ops.ssd_step(s64, ref.x, ref.dt, ref.A, ref.B, ref.C, ref.D)
        c64, cs64 = ops.causal_conv1d(xc.double().cpu()[:, None], w.double().cpu(), None, cs64)
    assert rel_err(y_out, y64) < 1e-2 and rel_err(state, s64) < 1e-5
    assert rel_err(c_out, F.silu(c64[:, 0])) < 1e-2 and torch.equal(conv_state.double().cpu(), cs64)


# --------------------------------------------------------------------------- fla scan backend


def scan_inputs(b, t, h, p, n, dtype=torch.bfloat16, seed=0):
    """Random SSD inputs on CUDA, rounded to ``dtype`` (the initial state stays float32)."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        x=randn(b, t, h, p, g=g, dtype=dtype, device="cuda"),
        dt=F.softplus(randn(b, t, h, g=g) - 1).to("cuda", dtype),
        A=(-torch.rand(h, generator=g, dtype=torch.float64) * 2 - 0.1).to("cuda", torch.float32),
        B=randn(b, t, h, n, g=g, dtype=dtype, device="cuda", scale=n**-0.5),
        C=randn(b, t, h, n, g=g, dtype=dtype, device="cuda", scale=n**-0.5),
        D=randn(h, g=g, device="cuda", dtype=torch.float32),
        S0=randn(b, h, n, p, g=g, device="cuda", dtype=torch.float32),
    )


def resets(kind: str, b: int, t: int, device: str = "cuda") -> torch.Tensor | None:
    if kind == "none":
        return None
    r = torch.zeros(b, t, dtype=torch.bool, device=device)
    r[:, 0] = True  # a prompt's first token (position 0)
    if kind == "packed" and t > 66:
        r[0, 0] = False  # row 0 continues its initial state, then a document starts at 37
        r[0, 37] = True
        r[-1, 64] = r[-1, 65] = True  # a one-token document
    elif kind == "packed":
        r[0, 0] = False
        r[-1, t - 2] = True
    return r


@pytest.fixture(scope="module")
def fla_scan():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    pytest.importorskip("fla")
    from mambaify.ops.triton import fla_scan as module

    return module


# Odd lengths; the second odd widths too; the third a prompt shorter than one chunk (its "packed"
# case: row 0 carries its initial state, the last row restarts two tokens before its end); the
# fourth one token, which ops.ssd_scan no longer sends to fla (a suspect in the H200 run where
# transformers' generate on a bf16 hybrid produced text its own forward found improbable).
FLA_SHAPES = [(2, 100, 4, 64, 64), (1, 157, 3, 48, 32), (3, 5, 4, 64, 64), (2, 1, 4, 64, 64)]


# fla autotunes every kernel once per process and input shape, which takes minutes (chunk_gla's
# backward most: on the H200 one shape ran past 240 s), so spreading these tests over xdist workers
# would repeat the autotuning in each (check.sh runs the GPU tests with --dist loadgroup).
# chunk_simple_gla (inference, and the whole-model tests) keeps to one worker per head width;
# chunk_gla (training on Hopper) to one worker per shape, so that its shapes tune side by side,
# with a longer time limit for the test that tunes.
def fla_group(kernel: str, p: int = 64, n: int = 64, shape: str = ""):
    return pytest.mark.xdist_group(f"fla-{kernel}-{p}x{n}{shape}")


FLA_GROUP = fla_group("simple_gla")
FLA_GLA_TIMEOUT_S = 600


def fla_case(kernel: str, shape: tuple) -> pytest.param:
    name = "b{}t{}h{}p{}n{}".format(*shape)
    if kernel == "simple_gla":
        marks = [fla_group(kernel, shape[3], shape[4])]
    else:
        marks = [fla_group(kernel, shape[3], shape[4], "-" + name), pytest.mark.timeout(FLA_GLA_TIMEOUT_S)]
    return pytest.param(kernel, shape, marks=marks, id=f"{kernel}-{name}")


FLA_CASES = [fla_case(kernel, shape) for shape in FLA_SHAPES for kernel in ("simple_gla", "gla")]


@pytest.mark.parametrize("p, n", [(12, 32), (64, 8)])
def test_fla_backend_leaves_heads_narrower_than_its_tiles_to_the_reference(p, n):
    """fla's tl.dot tiles need 16 wide heads (chunk_gla's backward fails to compile at p = 12 on
    the H200); narrower ones take the reference, bit for bit, on any device (here the CPU)."""
    pytest.importorskip("fla")
    from mambaify.ops.triton import fla_scan as module

    assert min(p, n) < module.FLA_MIN_HEAD_DIM
    g = torch.Generator().manual_seed(0)
    b, t, h = 2, 37, 3
    f32 = dict(g=g, dtype=torch.float32)  # float64 would take the reference for its own reason
    x, B, C = randn(b, t, h, p, **f32), randn(b, t, h, n, **f32), randn(b, t, h, n, **f32)
    dt, A, S0 = torch.rand(b, t, h, generator=g), -torch.rand(h, generator=g), randn(b, h, n, p, **f32)
    y, s = module.fla_ssd_scan(x, dt, A, B, C, None, S0)
    y_ref, s_ref = ops.ssd_chunked(x, dt, A, B, C, None, S0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def gla_recurrence(q, k, v, g, kernel, initial_state=None, cu_seqlens=None, cu_seqlens_cpu=None):
    """What fla's chunk_simple_gla / chunk_gla compute (scale 1, final states asked for), one token
    at a time in float64, with fla's varlen convention: batch 1, one initial and one final state
    per cu_seqlens segment. Stands in for the Triton kernels so that the CPU checks the wrapper."""
    b, t, h, kd = q.shape
    q, k, v, g = (u.double() for u in (q, k, v, g))
    if cu_seqlens is None:
        spans = [(r, 0, t) for r in range(b)]
    else:
        assert b == 1 and torch.equal(cu_seqlens.cpu(), cu_seqlens_cpu)
        bounds = cu_seqlens_cpu.tolist()
        spans = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    o = torch.full_like(v, float("nan"))  # a token no span covers stays NaN
    finals = []
    for i, (r, s, e) in enumerate(spans):
        S = initial_state[i].double() if initial_state is not None else v.new_zeros(h, kd, v.shape[-1])
        for j in range(s, e):
            S = g[r, j].exp()[:, None, None] * S + k[r, j][:, :, None] * v[r, j][:, None, :]
            o[r, j] = torch.einsum("hk,hkv->hv", q[r, j], S)
        finals.append(S)
    return o.float(), torch.stack(finals).float()


@pytest.mark.parametrize("reset_kind", ["none", "t0", "packed", "shared-t0", "shared-packed"])
def test_fla_wrapper_cuts_segments_as_the_reference(monkeypatch, reset_kind):
    """fla_scan's bookkeeping around fla (dtypes, the decay, D, initial states, the varlen cuts
    at row starts and resets), on the CPU, with fla's kernel replaced by its recurrence. "shared"
    resets are (1, t), derived from position ids every row shares, as the model passes them;
    the H200 showed that cutting segments from that one row left the other rows unwritten."""
    pytest.importorskip("fla")
    from mambaify.ops.triton import fla_scan as module

    monkeypatch.setattr(module, "_gla", gla_recurrence)
    b, t, h, p, n = 3, 70, 2, 4, 3
    g = torch.Generator().manual_seed(4)
    f32 = dict(g=g, dtype=torch.float32)
    x, B, C = randn(b, t, h, p, **f32), randn(b, t, h, n, **f32), randn(b, t, h, n, **f32)
    dt, A = torch.rand(b, t, h, generator=g), -torch.rand(h, generator=g) * 3
    D, S0 = randn(h, **f32), randn(b, h, n, p, **f32)
    if reset_kind.startswith("shared"):
        reset = torch.zeros(1, t, dtype=torch.bool)
        reset[0, 0] = True
        if reset_kind == "shared-packed":
            reset[0, 20] = reset[0, 21] = True
    else:
        reset = resets(reset_kind, b, t, device="cpu")
    y, s = module.fla_scan(x, dt, A, B, C, D, S0, reset, kernel="simple_gla")
    y_ref, s_ref = ops.ssd_sequential(x.double(), dt.double(), A.double(), B.double(), C.double(),
                                      D.double(), S0.double(), reset)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("reset_kind", ["none", "t0", "packed"])
@pytest.mark.parametrize("kernel, shape", FLA_CASES)
def test_fla_scan_forward_backward(fla_scan, kernel, shape, reset_kind):
    # Where fla refuses chunk_simple_gla's gated backward (fla issue 640: Hopper, triton < 3.7.1)
    # the backend still uses it for inference, so its forward is checked all the same.
    forward_only = kernel == "simple_gla" and not fla_scan.simple_gla_backward_ok(torch.cuda.current_device())
    b, t, h, p, n = shape
    i = scan_inputs(b, t, h, p, n)
    reset = resets(reset_kind, b, t)
    leaves = [i.x, i.dt, i.A, i.B, i.C, i.D, i.S0]
    # The reference in float32 on the same bf16-rounded values.
    ref_leaves = [v.detach().float().requires_grad_(True) for v in leaves]
    for v in leaves:
        v.requires_grad_(not forward_only)
    g = torch.Generator().manual_seed(1)
    w_y = randn(b, t, h, p, g=g, device="cuda", dtype=torch.float32)
    w_s = randn(b, h, n, p, g=g, device="cuda", dtype=torch.float32)

    y, s = fla_scan.fla_scan(*leaves, reset=reset, kernel=kernel)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and s.shape == (b, h, n, p)
    y_ref, s_ref = ops.ssd_chunked(*ref_leaves, reset=reset)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(s, s_ref) < 1e-2
    if forward_only:
        return

    grads = torch.autograd.grad((y.float() * w_y).sum() + (s * w_s).sum(), leaves)
    ref_grads = torch.autograd.grad((y_ref * w_y).sum() + (s_ref * w_s).sum(), ref_leaves)
    scale = max(float(w.abs().max()) for w in ref_grads)
    for name, got, want in zip(["x", "dt", "A", "B", "C", "D", "S0"], grads, ref_grads):
        if want.abs().max() == 0:
            # S0 when every row starts with a reset, and A when each row is that one reset token:
            # nothing flows back, up to fla's rounding of its cumulative gates (5e-7 measured
            # on the H200 for A at t = 1, against gradients of order 1; a missed reset gives O(1)).
            assert float(got.abs().max()) <= 1e-5 * scale, name
        else:
            assert rel_err(got, want) < 2e-2, name


@FLA_GROUP
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fla_backend_is_registered_and_preferred(fla_scan):
    assert ops.select_backend(torch.device("cuda")) == "fla"
    i = scan_inputs(2, 70, 2, 64, 64, dtype=torch.float32, seed=2)
    reset = resets("packed", 2, 70)
    y, s = ops.ssd_scan(i.x, i.dt, i.A, i.B, i.C, i.D, i.S0, reset)
    y_ref, s_ref = ops.ssd_scan(i.x, i.dt, i.A, i.B, i.C, i.D, i.S0, reset, backend="chunked")
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2
    # Under autocast the inputs stay as given (the scan makes its own dtype choices).
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ac, _ = ops.ssd_scan(i.x, i.dt, i.A, i.B, i.C, i.D, i.S0, reset)
    assert y_ac.dtype == torch.float32 and rel_err(y_ac, y_ref) < 1e-2
    # float64 goes to the reference, exactly.
    i64 = SimpleNamespace(**{k: v.double() for k, v in vars(i).items()})
    y64, _ = ops.ssd_scan(i64.x, i64.dt, i64.A, i64.B, i64.C, i64.D, i64.S0, reset)
    y64_ref, _ = ops.ssd_chunked(i64.x, i64.dt, i64.A, i64.B, i64.C, i64.D, i64.S0, reset)
    assert torch.equal(y64, y64_ref)


@fla_group("gla", shape="-training")
@pytest.mark.timeout(FLA_GLA_TIMEOUT_S)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fla_auto_kernel_choice_trains(fla_scan):
    """'auto' picks a kernel whose backward runs on this machine (chunk_gla on Hopper + old triton)."""
    i = scan_inputs(2, 64, 2, 64, 64, seed=3)
    x = i.x.clone().requires_grad_(True)
    y, s = fla_scan.fla_scan(x, i.dt, i.A, i.B, i.C, i.D, i.S0)
    (gx,) = torch.autograd.grad(y.float().sum() + s.sum(), (x,))
    assert torch.isfinite(gx).all()
