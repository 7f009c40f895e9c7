"""Decode / verify attention over a static KV cache (mambaify.ops.attention): reference, dispatch
and the Triton flash-decoding kernels.

* The visibility rule (attention_mask_from_slots) against a literal reading of it and against the
  generation engine's own mask; the reference against the engine's SDPA path with that mask;
  input checks; the split-count heuristic: always, on the CPU.
* The Triton kernels against the float64 reference: compiled on CUDA (``gpu`` marker), else in
  Triton's interpreter on the CPU, in a subprocess started with TRITON_INTERPRET=1
  (:func:`test_kernels_in_triton_interpreter`; tests/test_triton_ops.py explains why).
  Every kernel case fills the slots no query of a row may see with NaN: a finite result equal
  to the reference proves they are neither read into a score nor into a value sum.
* On CUDA: bf16/fp16 at an 8B-shaped layer, and a CUDA graph captured once and replayed while
  the query slots advance.
"""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch

from mambaify.ops import attention as attn_ops
from mambaify.ops.attention import attention_mask_from_slots, decode_attention, decode_attention_reference
from tests._triton_cases import (
    HAS_CUDA,
    INTERPRET,
    gpu,
    kernel_module,
    needs_triton,
    run_interpreter_cases,
)


# Tolerances against the float64 reference on the same (rounded) inputs.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def randn(*shape, g, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def slot_rows(S: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: no padding with the first query at slot 0 (it sees itself only); padding 7 and
    the last query at slot S - 1; padding 20 and queries mid-buffer. Each row's t queries sit in
    consecutive slots, as a verify call writes them."""
    kv_start = torch.tensor([0, 7, 20])
    last = torch.tensor([t - 1, S - 1, 26 + t])
    return kv_start, last[:, None] - (t - 1) + torch.arange(t)


def problem(b, h, kv, t, d, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        q=randn(b, h, t, d, g=g, dtype=dtype, device=device),
        k=randn(b, kv, S, d, g=g, dtype=dtype, device=device),
        v=randn(b, kv, S, d, g=g, dtype=dtype, device=device),
        scale=d**-0.5,
    )


def poison_unseen(p: SimpleNamespace, kv_start, query_slots, window) -> SimpleNamespace:
    """Copies of k and v with NaN in every slot that no query of its row may see."""
    S = p.k.shape[2]
    seen = attention_mask_from_slots(kv_start, query_slots, S, window)[:, 0].any(dim=1)  # (b, S)
    hide = ~seen.to(p.k.device)[:, None, :, None]
    nan = torch.tensor(float("nan"), dtype=p.k.dtype, device=p.k.device)
    return SimpleNamespace(k=torch.where(hide, nan, p.k), v=torch.where(hide, nan, p.v), hidden=int((~seen).sum()))


def reference64(p, kv_start, query_slots, window):
    return decode_attention_reference(
        p.q.double().cpu(), p.k.double().cpu(), p.v.double().cpu(), kv_start.cpu(), query_slots.cpu(), p.scale, window
    )


# --------------------------------------------------------------------------- the rule, the reference


def test_mask_follows_the_rule():
    S = 30
    kv_start = torch.tensor([0, 4, 12, 29])
    # Row 2 has queries on padding slots (prefill of a left-padded row): they see only themselves.
    query_slots = torch.tensor([[0, 5, 9], [4, 10, 29], [10, 11, 20], [29, 29, 29]])
    for window in (None, 1, 3):
        mask = attention_mask_from_slots(kv_start, query_slots, S, window)
        assert mask.shape == (4, 1, 3, S) and mask.dtype == torch.bool
        for b in range(4):
            for i in range(3):
                q = int(query_slots[b, i])
                for s in range(S):
                    rule = kv_start[b] <= s <= q and (window is None or q - s < window)
                    assert bool(mask[b, 0, i, s]) == (rule or s == q), (window, b, i, s)


@pytest.mark.parametrize("window", [None, 3])
def test_mask_is_the_engines_mask(window):
    """attention_mask_from_slots(pad_lengths, slots) equals the mask the generation engine builds
    for prefill and decode (DecodingStack.context, then ForwardContext.attention_mask), so the
    engine may take this one definition for its SDPA path."""
    from mambaify.generate.engine import DecodingStack

    S = 12
    pad_lengths = torch.tensor([0, 3, 7])
    stack = SimpleNamespace(slot_range=torch.arange(S), has_attention=False)
    for query_slots in (torch.arange(8), torch.tensor([8]), torch.tensor([11])):  # prefill, decode steps
        ctx = DecodingStack.context(stack, None, query_slots, S, pad_lengths)
        expected = ctx.attention_mask(window)
        mask = attention_mask_from_slots(pad_lengths, query_slots, S, window)
        assert torch.equal(mask, expected.expand_as(mask))


@pytest.mark.parametrize("group,t,window", [(1, 1, None), (2, 3, None), (4, 5, 4), (4, 1, 2)])
def test_reference_is_the_engines_sdpa_path(group, t, window):
    from mambaify.generate.engine import grouped_query_attention

    kv, d, S = 2, 16, 40
    p = problem(3, kv * group, kv, t, d, S, torch.float64, "cpu", seed=group * 10 + t)
    kv_start, query_slots = slot_rows(S, t)
    mask = attention_mask_from_slots(kv_start, query_slots, S, window)
    expected = grouped_query_attention(p.q, p.k, p.v, mask, p.scale)
    ref = decode_attention_reference(p.q, p.k, p.v, kv_start, query_slots, p.scale, window)
    assert ref.dtype == torch.float64 and ref.shape == p.q.shape
    assert rel_err(ref, expected) < 1e-13
    # The same per head and query with an explicit loop over visible slots.
    b, i, j = 1, t - 1, group * kv - 1
    slots = mask[b, 0, i].nonzero()[:, 0]
    k, v = p.k[b, j // group, slots], p.v[b, j // group, slots]
    w = torch.softmax(k @ p.q[b, j, i] * p.scale, dim=0)
    assert torch.allclose(ref[b, j, i], w @ v, atol=1e-13, rtol=0)


def test_reference_ignores_unseen_slots_and_dispatches_on_cpu():
    S, t = 40, 3
    p = problem(3, 4, 2, t, 16, S, torch.float64, "cpu", seed=5)
    kv_start, query_slots = slot_rows(S, t)
    bad = poison_unseen(p, kv_start, query_slots, 5)
    assert bad.hidden > 0
    clean = decode_attention_reference(p.q, p.k, p.v, kv_start, query_slots, p.scale, 5)
    dirty = decode_attention_reference(p.q, bad.k, bad.v, kv_start, query_slots, p.scale, 5)
    assert torch.isfinite(clean).all() and torch.equal(clean, dirty)
    out = torch.empty_like(p.q)
    got = decode_attention(p.q, bad.k, bad.v, kv_start, query_slots, p.scale, 5, out=out)
    assert got is out and torch.equal(out, clean)
    # bf16 on the CPU: computed in float32, returned in bf16.
    q16, k16, v16 = (x.to(torch.bfloat16) for x in (p.q, p.k, p.v))
    low = decode_attention(q16, k16, v16, kv_start, query_slots, p.scale)
    assert low.dtype == torch.bfloat16
    assert rel_err(low, decode_attention_reference(q16.double(), k16.double(), v16.double(), kv_start, query_slots, p.scale)) < 1e-2


def test_bad_inputs_are_named():
    p = problem(2, 4, 2, 1, 16, 10, torch.float32, "cpu")
    kv_start, slots = torch.tensor([0, 2]), torch.tensor([[5], [9]])
    cases = [
        (dict(k=p.k[:, :, :, :8], v=p.v[:, :, :, :8]), "d=16"),
        (dict(k=torch.randn(2, 3, 10, 16), v=torch.randn(2, 3, 10, 16)), "multiple of the 3 kv heads"),
        (dict(v=p.v.double()), "share one of"),
        (dict(slots=torch.tensor([[5], [10]])), "query_slots must lie in [0, 9]"),
        (dict(slots=torch.tensor([[5.0], [9.0]])), "integer tensor"),
        (dict(slots=torch.tensor([[5, 6], [9, 9]])), "query_slots must be (b, t) = (2, 1)"),
        (dict(kv_start=torch.tensor([0, 11])), "kv_start must lie in [0, 10]"),
        (dict(window=0), "sliding_window must be None or a positive int"),
        (dict(window=4.0), "sliding_window must be None or a positive int"),
        (dict(out=torch.empty(2, 4, 1, 8)), "out must be (2, 4, 1, 16)"),
    ]
    for change, message in cases:
        a = dict(k=p.k, v=p.v, kv_start=kv_start, slots=slots, window=None, out=None) | change
        with pytest.raises(ValueError, match=re.escape(message)):
            decode_attention(p.q, a["k"], a["v"], a["kv_start"], a["slots"], p.scale, a["window"], a["out"])


@needs_triton
def test_split_count_fills_the_gpu(monkeypatch):
    """Small batches get enough splits for about two programs per SM (132 SMs: an H200), never
    fewer than MIN_KEYS_PER_SPLIT keys a split; large batches one split (no combine step)."""
    kernels = importlib.import_module("mambaify.ops.triton.decode_attention")
    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)
    choose = lambda b, S, qb=1: kernels.choose_num_splits(b, 8, qb, S, torch.device("cuda"))  # noqa: E731
    assert choose(1, 32768) == 33 and 8 * 33 >= 2 * 132
    assert choose(1, 8192) == 33 and choose(1, 1024) == 1024 // kernels.MIN_KEYS_PER_SPLIT
    assert choose(16, 32768) == 3 and choose(64, 32768) == 1 and choose(1, 100) == 1
    assert choose(1, 32768, qb=40) == 1
    assert kernels.choose_num_splits(1, 1, 1, 10**6, torch.device("cuda")) == kernels.MAX_SPLITS
    assert kernels.block_sizes(4, 128) == (16, 64, 128)  # 8B decode in bf16: the group's 4 heads
    assert kernels.block_sizes(68, 128)[0] == 128 and kernels.block_sizes(20, 80) == (32, 64, 128)
    # Key blocks of at most 32 KB (K and V together), so three pipeline stages fit in shared memory.
    assert kernels.block_sizes(4, 128, itemsize=4)[1] == 32 and kernels.block_sizes(4, 256) == (16, 32, 256)


# --------------------------------------------------------------------------- the Triton kernels


@needs_triton
@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="kernels run compiled on CUDA / this is the subprocess")
def test_kernels_in_triton_interpreter():
    """The ``interp`` kernel cases below, in a fresh interpreter with TRITON_INTERPRET=1."""
    run_interpreter_cases(__file__, "interp", timeout=900)


@pytest.fixture
def kernels(request):
    """mambaify.ops.triton.decode_attention, compiled for CUDA or, in the subprocess, interpreted."""
    return kernel_module(request, "mambaify.ops.triton.decode_attention")


KERNEL_CASES = [
    pytest.param("cpu", torch.float64, marks=needs_triton, id="interp-f64"),
    pytest.param("cpu", torch.float32, marks=needs_triton, id="interp-f32"),
    # Half precision in the interpreter: fp16 only (its bf16 tl.dot is wrong); bf16 on CUDA.
    pytest.param("cpu", torch.float16, marks=needs_triton, id="interp-f16"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-f32"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
]

# (t, group, d, sliding window): t = 1 (decode) and 3, 5 (verify); GQA groups 1, 2, 4; head dims
# 16, 32 and 24 (not a power of two: masked lanes); windows shorter than the context.
SHAPES = [(1, 1, 16, None), (3, 2, 32, None), (5, 4, 16, 4), (3, 4, 24, None), (1, 2, 32, 6), (5, 1, 24, 2)]
# Every shape in float64 (tight) and on CUDA; in the interpreter float32 on two shapes and
# float16 (low-precision products, p rounded to fp16) on one, to keep CI's interpreter run short.
_INTERP_SHAPES = {"interp-f32": SHAPES[1:3], "interp-f16": SHAPES[3:4]}
SHAPE_CASES = [
    pytest.param(*case.values, *shape, marks=case.marks, id=f"{case.id}-t{shape[0]}-g{shape[1]}-d{shape[2]}-w{shape[3]}")
    for case in KERNEL_CASES
    for shape in _INTERP_SHAPES.get(case.id, SHAPES)
]


@pytest.mark.parametrize("device,dtype,t,group,d,window", SHAPE_CASES)
def test_kernel_matches_reference(kernels, device, dtype, t, group, d, window):
    kv, S, block = 2, 48, 16
    p = problem(3, kv * group, kv, t, d, S, dtype, device, seed=t * 100 + group * 10 + d)
    kv_start, query_slots = slot_rows(S, t)
    ref = reference64(p, kv_start, query_slots, window)
    bad = poison_unseen(p, kv_start, query_slots, window)
    assert bad.hidden > 0
    # The keys a row's programs must walk: from its first visible slot to its last query's.
    seen = attention_mask_from_slots(kv_start, query_slots, S, window)[:, 0].any(dim=1)
    first = torch.tensor([int(row.nonzero().min()) for row in seen])
    needed_blocks = (query_slots.max(dim=1).values - first + block) // block  # ceil((last - first + 1) / block)
    kv_start, query_slots = kv_start.to(device), query_slots.to(device)
    # One split walking up to three key blocks; 4 splits, so row 1 gives each of three splits one
    # block and leaves one empty, rows 0 and 2 (one block) leave three empty; and the automatic
    # split count with the default key block.
    for splits, block_n in ((1, block), (4, block), (None, None)):
        visited = None if splits is None else torch.full((3, kv, splits), -1, dtype=torch.int32, device=device)
        out = kernels.decode_attention(
            p.q, bad.k, bad.v, kv_start, query_slots, p.scale, window,
            num_splits=splits, block_n=block_n, visited_blocks=visited,
        )
        assert out.dtype == dtype and out.shape == p.q.shape
        assert torch.isfinite(out).all(), (splits, block_n)
        assert rel_err(out, ref) < TOL[dtype], (splits, block_n, rel_err(out, ref))
        if visited is not None:
            # Blocks before kv_start / the window and past the last query are never read: one
            # split reads exactly the needed blocks, several splits at most one partial block each.
            total = visited.sum(dim=2).cpu()
            assert (visited >= 0).all()
            if splits == 1:
                assert torch.equal(total, needed_blocks[:, None].expand(3, kv).int()), (total, needed_blocks)
            else:
                assert (total >= needed_blocks[:, None]).all() and (total < needed_blocks[:, None] + splits).all()
    assert int(needed_blocks.min()) < S // block  # the skip is visible: some row reads less than the buffer


@pytest.mark.parametrize("device,dtype", [c for c in KERNEL_CASES if c.id != "interp-f16"])
def test_kernel_strided_views_out_and_padding_queries(kernels, device, dtype):
    """As the engine would call it: query a transposed (b, t, h, d) projection, keys/values the
    readable slice of a longer buffer, ``out`` a transposed buffer written in place, query_slots
    (t,) shared by the rows (prefill), some queries on padding slots, int32 slots."""
    b, h, kv, t, d, S, capacity = 2, 4, 2, 6, 16, 12, 20
    g = torch.Generator().manual_seed(7)
    q = randn(b, t, h, d, g=g, dtype=dtype, device=device).transpose(1, 2)
    k_buf, v_buf = (randn(b, kv, capacity, d, g=g, dtype=dtype, device=device) for _ in range(2))
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    kv_start = torch.tensor([0, 8], dtype=torch.int32, device=device)
    query_slots = torch.arange(5, 5 + t, dtype=torch.int32, device=device)  # row 1: slots 5..7 are padding
    p = SimpleNamespace(q=q, k=k, v=v, scale=0.37)
    ref = reference64(p, kv_start.long(), query_slots.long(), None)
    out_buf = torch.full((b, t, h, d), float("nan"), dtype=dtype, device=device)
    out = out_buf.transpose(1, 2)
    for splits in (1, 2):
        got = kernels.decode_attention(q, k, v, kv_start, query_slots, p.scale, out=out, num_splits=splits, block_n=16)
        assert got is out
        assert rel_err(out_buf.transpose(1, 2), ref) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", [c for c in KERNEL_CASES if c.id in ("interp-f64", "cuda-bf16")])
def test_kernel_many_query_rows(kernels, device, dtype):
    """More rows than one block holds (group 4 x 40 tokens = 160 > 128): several query blocks,
    each walking only the keys its rows see (a causal prefill)."""
    b, kv, group, t, d, S = 1, 1, 4, 40, 16, 48
    p = problem(b, kv * group, kv, t, d, S, dtype, device, seed=11)
    kv_start, query_slots = torch.tensor([3]), torch.arange(8, 8 + t)[None]
    ref = reference64(p, kv_start, query_slots, None)
    out = kernels.decode_attention(p.q, p.k, p.v, kv_start.to(device), query_slots.to(device), p.scale, num_splits=2)
    assert rel_err(out, ref) < TOL[dtype]


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,S", [(1, 1, 4096), (2, 5, 4096), (16, 1, 1024), (3, 17, 2048)])
def test_cuda_8b_shape_against_reference(dtype, b, t, S):
    """The 8B layer's heads (32 query heads, 8 kv heads, d 128), automatic splits, through the
    public dispatcher."""
    assert attn_ops._triton_kernels(torch.empty(1, device="cuda", dtype=dtype)) is not None
    p = problem(b, 32, 8, t, 128, S, dtype, "cuda", seed=b + t)
    g = torch.Generator().manual_seed(1)
    kv_start = torch.randint(0, S // 4, (b,), generator=g)
    last = torch.randint(S // 2, S, (b,), generator=g)
    query_slots = last[:, None] - (t - 1) + torch.arange(t)
    for window in (None, 1000):
        ref = reference64(p, kv_start, query_slots, window)
        bad = poison_unseen(p, kv_start, query_slots, window)
        out = decode_attention(p.q, bad.k, bad.v, kv_start.cuda(), query_slots.cuda(), p.scale, window)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("t", [1, 5])
def test_cuda_graph_replay_with_advancing_slots(t):
    """Capture one call (several splits, so the combine kernel is in the graph too), then replay
    it while the query slots advance and new queries come in: each replay equals the reference.
    Slots before kv_start and past the last replay's queries hold NaN: no replay reads them."""
    b, S, dtype, steps = 2, 2048, torch.bfloat16, 6
    p = problem(b, 32, 8, t, 128, S, dtype, "cuda", seed=3)
    kernels = importlib.import_module("mambaify.ops.triton.decode_attention")
    kv_start = torch.tensor([0, 100], device="cuda")
    query_slots = (torch.tensor([[300], [900]]) + torch.arange(t)).cuda()
    final = poison_unseen(p, kv_start.cpu(), query_slots.cpu() + (steps - 1) * t, None)
    p.k, p.v = final.k, final.v
    q_in = p.q.clone()
    out = torch.empty_like(p.q)
    call = lambda: decode_attention(q_in, p.k, p.v, kv_start, query_slots, p.scale, out=out)  # noqa: E731
    call()  # warm-up: compiles, allocates the workspace
    torch.cuda.synchronize()
    assert kernels.choose_num_splits(b, 8, 1, S, out.device) > 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        query_slots += t if step else 0
        q_in.copy_(randn(b, 32, t, 128, g=g, dtype=dtype, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference64(SimpleNamespace(q=q_in, k=p.k, v=p.v, scale=p.scale), kv_start, query_slots, None)
        assert rel_err(out, ref) < TOL[dtype], step
