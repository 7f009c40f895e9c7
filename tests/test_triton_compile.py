"""Every Triton kernel compiles for Hopper (sm_90, the H200), here, without a GPU.

The interpreter runs the kernels' logic on the CPU but not the compiler, so what only the GPU
build checks (block shapes and layouts, types of loop-carried values, lowering to PTX) would
first fail on the GPU machine. Triton ships its own ptxas, so compiling ahead of time for
a named target needs no device. Pointer arguments are typed as the engines call the kernels:
bfloat16 activations, float32 states and partial sums, int64 counts and slots.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mambaify.ops.triton import decode, decode_attention, gemv, norm, verify  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
F32_POINTERS = {"state_ptr", "ckpt_ptr", "states_ptr", "A_ptr", "D_ptr", "rstd_ptr", "dw_ptr",
                "o_part_ptr", "lse_part_ptr"}
INT_POINTERS = {"counts_ptr", "start_ptr", "slots_ptr", "visited_ptr", "slot_ptr"}
FLOAT_SCALARS = {"eps", "scale_log2e"}


def compile_for_hopper(kernel, constexprs: dict, num_warps: int = 4, types: dict | None = None,
                       launched: dict | None = None):
    """Compile ``kernel`` with the given constexpr values; other arguments are typed by name
    (``types``: where a name's type differs from its usual one). ``launched``: compile it as a
    launch specialises it (integer argument -> its value there): as the JIT does, every pointer
    and every such integer divisible by 16 is marked so (aligned vector loads), and one equal to 1
    becomes a constant (a contiguous dimension's stride)."""
    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if launched is not None and not param.is_constexpr:
            if name.endswith("_ptr"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif launched.get(name) == 1:
                constexprs[name] = 1
                signature[name] = "constexpr"
                continue
            elif name in launched and launched[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif types and name in types:
            signature[name] = types[name]
        elif name in ("tickets_ptr", "count_ptr"):
            signature[name] = "*i32"
        elif name in F32_POINTERS:
            signature[name] = "*fp32"
        elif name in INT_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64"  # sizes and strides
    missing = {n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr} - set(constexprs)
    assert not missing, f"give values for {sorted(missing)}"
    source = ASTSource(
        fn=kernel, signature=signature,
        constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs,
    )
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps})


CASES = {
    "ssd_step": (decode._ssd_step_kernel, dict(HAS_D=True, DT_SOFTPLUS=True, BLOCK_N=128, BLOCK_P=32)),
    "conv_ssd_step": (decode._conv_ssd_step_kernel,
                      dict(KC=4, WIN=4, HAS_CB=True, HAS_D=True, DT_SOFTPLUS=True, BLOCK_N=128, BLOCK_P=16)),
    "conv_step": (decode._conv_step_kernel,
                  dict(K=4, BLOCK_K=4, BLOCK_D=256, HAS_BIAS=True, APPLY_SILU=True, ACC=tl.float32)),
    "gated_rmsnorm_fwd": (norm._gated_rmsnorm_fwd_kernel, dict(BLOCK_N=4096, ACC=tl.float32)),
    "gated_rmsnorm_bwd": (norm._gated_rmsnorm_bwd_kernel, dict(BLOCK_N=4096, ACC=tl.float32)),
    "ssd_verify": (verify._ssd_verify_kernel,
                   dict(HAS_D=True, DT_SOFTPLUS=True, STORE_STATES=False, SHARED_BH=True, PREFETCH=True, BLOCK_T=16,
                        BLOCK_N=128, BLOCK_P=32)),
    "ssd_verify_per_step_loads": (verify._ssd_verify_kernel,
                                  dict(HAS_D=True, DT_SOFTPLUS=True, STORE_STATES=False, SHARED_BH=True, PREFETCH=False,
                                       BLOCK_T=16, BLOCK_N=128, BLOCK_P=32)),
    "ssd_verify_store_states": (verify._ssd_verify_kernel,
                                dict(HAS_D=True, DT_SOFTPLUS=False, STORE_STATES=True, SHARED_BH=False, PREFETCH=True,
                                     BLOCK_T=16, BLOCK_N=128, BLOCK_P=32)),
    "conv_verify": (verify._conv_verify_kernel,
                    dict(K=4, BLOCK_T=8, BLOCK_H=4, BLOCK_C=128, HAS_BIAS=True, APPLY_SILU=True, ACC=tl.float32)),
    # Decode at the 8B shape: a group of 4 query heads x 1 token, padded to a 16-row tile.
    "attention_partial": (decode_attention._attention_partial_kernel,
                          dict(HAS_WINDOW=True, SINGLE_SPLIT=False, COUNT_BLOCKS=False, ACC=tl.float32,
                               DOT_PRECISION="ieee", BLOCK_M=16, BLOCK_N=64, BLOCK_D=128)),
    "attention_single_split": (decode_attention._attention_partial_kernel,
                               dict(HAS_WINDOW=False, SINGLE_SPLIT=True, COUNT_BLOCKS=False, ACC=tl.float32,
                                    DOT_PRECISION="ieee", BLOCK_M=32, BLOCK_N=64, BLOCK_D=128)),
    "attention_combine": (decode_attention._attention_combine_kernel, dict(BLOCK_SPLITS=64, BLOCK_D=128)),
}
# The split-K GEMV: one row on the CUDA cores and 16 through tl.dot, its splits' float32 partial
# sums added in its own launch (the last split, after an atomic count) or by the sum kernel.
GEMV = dict(BLOCK_N=32, BLOCK_K=256, ACC=tl.float32, DOT_PRECISION="tf32", PDL=False, GROUPED=False, NORM=False,
            RESIDUAL=False, GATE=False, NORM_PARTS=False, PREPARE=False, SCALED=False)
PREPARED = {"parts_ptr": "*fp32", "next_parts_ptr": "*fp32"}  # a prepared norm's sums of squares
GEMV_PARTIALS = {"out_ptr": "*fp32"}
INT8 = {name: "*i8" for name in ("w_ptr", "w2_ptr", "wb_ptr", "wc_ptr")}  # int8 weights, bf16 scales
GEMV_CASES = {
    "gemv_one_row_split_one_launch": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=True, USE_DOT=False, LAST_SPLIT_SUMS=True), GEMV_PARTIALS),
    "gemv_dot_gated_split_one_launch": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=True), GEMV_PARTIALS),
    "gemv_dot_split_two_launches": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=False), GEMV_PARTIALS),
    "gemv_dot_final": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=True, USE_DOT=True, LAST_SPLIT_SUMS=False), None),
    "gemv_sum_splits": (gemv._sum_splits_kernel, dict(BLOCK_N=256, GATED=True, HAS_BIAS=False, NORM=False,
                                                        RESIDUAL=False, PDL=False, NORM_PARTS=False, PREPARE=False, SCALED=False),
                        {"part_ptr": "*fp32"}),
    "gemv_sum_splits_norm_residual": (gemv._sum_splits_kernel, dict(BLOCK_N=256, GATED=False, HAS_BIAS=True, NORM=True,
                                                                      RESIDUAL=True, PDL=False, NORM_PARTS=False,
                                                                      PREPARE=False, SCALED=False),
                                      {"part_ptr": "*fp32", "ssq_ptr": "*fp32"}),
    # A prepared norm (MAMBAIFY_PREPARED_NORMS=1): the residual-add GEMV that prepares the next
    # norm (its last split, its one split, or the split sums' own kernel), and the GEMVs after
    # the norm that scale their sums from the prepared sums of squares.
    "gemv_prepare_dot_split_one_launch": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, BLOCK_K=128, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=True,
        RESIDUAL=True, PREPARE=True), dict(GEMV_PARTIALS, **PREPARED)),
    "gemv_prepare_dot_final": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=True, USE_DOT=True, LAST_SPLIT_SUMS=False,
        RESIDUAL=True, PREPARE=True), PREPARED),
    "gemv_norm_parts_qkv_dot_final": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=False,
        GROUPED=True, NORM_PARTS=True), PREPARED),
    "gemv_norm_parts_gated_dot_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=True,
        NORM_PARTS=True), dict(GEMV_PARTIALS, **PREPARED)),
    "gemv_sum_splits_prepare": (gemv._sum_splits_kernel, dict(BLOCK_N=256, GATED=False, HAS_BIAS=False, NORM=False,
                                                                RESIDUAL=True, PDL=False, NORM_PARTS=False,
                                                                PREPARE=True, SCALED=False), dict(PREPARED, part_ptr="*fp32")),
    "gemv_sum_splits_norm_parts": (gemv._sum_splits_kernel, dict(BLOCK_N=256, GATED=True, HAS_BIAS=False,
                                                                   NORM=False, RESIDUAL=False, PDL=False,
                                                                   NORM_PARTS=True, PREPARE=False, SCALED=False),
                                   dict(PREPARED, part_ptr="*fp32")),
    # As a programmatic dependent launch (MAMBAIFY_PDL=1 on Hopper): one row, and gate+up through tl.dot.
    "gemv_one_row_pdl": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=True, USE_DOT=False, LAST_SPLIT_SUMS=True, PDL=True),
        GEMV_PARTIALS),
    # An attention layer's q, k and v in one launch, one row and several.
    "gemv_qkv_one_row": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True, GROUPED=True),
        GEMV_PARTIALS),
    "gemv_qkv_dot_pdl": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=True, USE_DOT=True, LAST_SPLIT_SUMS=False, GROUPED=True,
        PDL=True), None),
    "gemv_dot_gated_pdl": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=True, FINAL=True, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=False, PDL=True), None),
    # The RMSNorm folded in (x * g on load, the rows' squares summed, the scale where the sums
    # meet) and the residual added: one row split, rows through tl.dot gated, one split.
    "gemv_norm_residual_one_row_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True, NORM=True,
        RESIDUAL=True), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    "gemv_norm_dot_gated_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=True, NORM=True),
        dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    # Mamba2's gated RMSNorm (of x * silu(z)) folded into out_proj, the residual added.
    "gemv_gated_norm_residual_one_row_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True, NORM=True,
        RESIDUAL=True, GATE=True), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    "gemv_norm_residual_one_row_pdl": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True, NORM=True,
        RESIDUAL=True, PDL=True), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    # Several rows with K split (down_proj, o_proj in a verify call): SPLIT_DOT_CONFIG's K blocks
    # of 128, the residual added where the splits' sums meet.
    "gemv_dot_residual_split_k128": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, BLOCK_K=gemv.SPLIT_DOT_CONFIG[1], GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=True,
        LAST_SPLIT_SUMS=True, RESIDUAL=True), GEMV_PARTIALS),
    # Gate and up read together at one row, the norm folded in, K blocks of 128 (as
    # MAMBAIFY_GEMV_TUNE=1 may pick).
    "gemv_gated_norm_one_row_split_k128": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, BLOCK_K=128, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=False,
        LAST_SPLIT_SUMS=True, NORM=True), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    "gemv_norm_residual_final": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=True, USE_DOT=True, LAST_SPLIT_SUMS=False, NORM=True,
        RESIDUAL=True), None),
    # One row with its loop pipelined (MAMBAIFY_GEMV_STAGES=3 or 4; 2 copies through shared
    # memory without overlap): the norm and residual folded in, gate and up read together, and
    # as a programmatic dependent launch.
    "gemv_norm_residual_one_row_stages3": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True, NORM=True,
        RESIDUAL=True, STAGES=3), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    "gemv_gated_norm_one_row_k128_stages4": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, BLOCK_K=128, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=False,
        LAST_SPLIT_SUMS=True, NORM=True, STAGES=4), dict(GEMV_PARTIALS, ssq_ptr="*fp32")),
    "gemv_one_row_stages2": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=True, USE_DOT=False, LAST_SPLIT_SUMS=True,
        STAGES=2), GEMV_PARTIALS),
    # Int8 weights with a scale per row (a quantized draft): one row split, the residual added;
    # several rows through tl.dot, gate and up, the tiles converted for the tensor cores; q, k and v.
    "gemv_int8_one_row_residual_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=False, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=True,
        RESIDUAL=True, NORM=True, SCALED=True), dict(GEMV_PARTIALS, ssq_ptr="*fp32", **INT8)),
    "gemv_int8_dot_gated_split": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=16, GATED=True, FINAL=False, HAS_BIAS=False, USE_DOT=True, LAST_SPLIT_SUMS=True, SCALED=True),
        dict(GEMV_PARTIALS, **INT8)),
    "gemv_int8_qkv_one_row_final": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=True, HAS_BIAS=False, USE_DOT=False, LAST_SPLIT_SUMS=False,
        GROUPED=True, SCALED=True), INT8),
    "gemv_sum_splits_int8_gated": (gemv._sum_splits_kernel, dict(BLOCK_N=256, GATED=True, HAS_BIAS=False, NORM=False,
                                                                   RESIDUAL=False, PDL=False, NORM_PARTS=False,
                                                                   PREPARE=False, SCALED=True), {"part_ptr": "*fp32"}),
    "gemv_one_row_pdl_stages3": (gemv._gemv_kernel, dict(
        GEMV, BLOCK_M=1, GATED=False, FINAL=True, HAS_BIAS=True, USE_DOT=False, LAST_SPLIT_SUMS=False, PDL=True,
        STAGES=3), None),
}


# A GEMV call as the 8B decode step launches it (4096 x 4096, K split in four): row-major
# operands, the K dimension contiguous.
GEMV_LAUNCH = dict(M=4, N=4096, K=4096, k_per_split=1024, S=4, N_A=4096, N_B=0, x_sm=4096, x_sk=1, w_sn=4096,
                   w_sk=1, o_ss=16384, o_sp=16384, o_sm=4096, o_sn=1, f_sm=4096, f_sn=1, q_ss=512, q_sp=4,
                   r_sm=4096, r_sn=1, z_sm=4096, z_sk=1)


def gemv_stages(constexprs: dict) -> dict:
    """The case's constexprs with STAGES as the launcher passes it where the case names none."""
    default = gemv.DOT_STAGES if constexprs["USE_DOT"] else gemv.ONE_ROW_STAGES
    return {"STAGES": default, **constexprs}


# Every decode kernel both ways; the training-only norm backward has no PDL form.
@pytest.mark.parametrize("name,pdl", [
    pytest.param(name, pdl, id=name + ("-pdl" if pdl else ""))
    for name in sorted(CASES) for pdl in (False, True) if not pdl or "PDL" in CASES[name][0].arg_names
])
def test_kernel_compiles_for_hopper(name, pdl):
    """Every kernel compiles for sm_90, launched one after another or as a programmatic
    dependent launch (MAMBAIFY_PDL=1): then it waits for the kernel ahead before its first
    global load or store, and lets the next one launch after that."""
    kernel, constexprs = CASES[name]
    compiled = compile_for_hopper(kernel, dict(constexprs, PDL=pdl) if "PDL" in kernel.arg_names else constexprs)
    assert len(compiled.asm["cubin"]) > 0
    ptx = compiled.asm["ptx"]
    if not pdl:
        assert "griddepcontrol" not in ptx
        return
    wait = ptx.index("griddepcontrol.wait")
    assert not any(op in ptx[:wait] for op in ("ld.global", "st.global", "atom."))
    assert ptx.index("griddepcontrol.launch_dependents") > wait


@pytest.mark.parametrize("name", ["conv_ssd_step", "conv_verify", "ssd_verify", "ssd_verify_store_states"])
def test_decode_kernels_issue_every_load_before_their_first_store(name):
    """The decode step's fused conv + SSD kernel reads the slot, the state, xBC, the conv
    weights and the windows before it writes anything; the verify call's conv reads the
    window's history and the new inputs with the taps' inputs, before it stores y; its SSD
    kernel reads D with the rest, before the checkpoint's store. A store holds the warp until
    its value has arrived and later loads stay behind it, so these kernels once waited on
    global memory about once per window tap and group (the step's), or once more (the verify
    call's)."""
    kernel, constexprs = CASES[name]
    lines = compile_for_hopper(kernel, dict(constexprs, PDL=False)).asm["ptx"].splitlines()
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    stores = [i for i, line in enumerate(lines) if "st.global" in line]
    assert loads and stores and max(loads) < min(stores)


@pytest.mark.parametrize("name", sorted(GEMV_CASES))
def test_gemv_compiles_for_hopper(name):
    kernel, constexprs, types = GEMV_CASES[name]
    if kernel is gemv._gemv_kernel:
        constexprs = gemv_stages(constexprs)
        launched = compile_for_hopper(kernel, constexprs, types=types, launched=GEMV_LAUNCH).asm["ptx"]
        # The weight tiles go through shared memory (cp.async) wherever the loop is pipelined:
        # always through tl.dot, at one row with 2 stages or more; else they are loaded to
        # registers where they are reduced. The loop's wait leaves copies in flight (the next
        # tiles stream while this one is reduced) through tl.dot and at one row from 3 stages;
        # at 2 it waits for every copy before each step, so nothing overlaps.
        assert ("cp.async" in launched) == (constexprs["USE_DOT"] or constexprs["STAGES"] > 1), constexprs["STAGES"]
        waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", launched)]
        overlaps = constexprs["USE_DOT"] or constexprs["STAGES"] >= 3
        assert (bool(waits) and waits[0] > 0) == overlaps, (constexprs["STAGES"], waits)
    compiled = compile_for_hopper(kernel, constexprs, types=types)
    assert len(compiled.asm["cubin"]) > 0
    ptx = compiled.asm["ptx"]
    if constexprs.get("LAST_SPLIT_SUMS"):
        # One count per program and its release/acquire order, the others' partials read past L1,
        # split 0's and four more splits' loaded before the first of their adds (one wait on the
        # L2 per four splits, not one per split).
        assert "atom.global.acq_rel" in ptx.replace(".gpu", "") and "ld.global.cg" in ptx
        tail = ptx[ptx.index("atom.global"):]
        assert tail[:tail.index("add.f32")].count("ld.global.cg") >= 5
    if constexprs.get("USE_DOT"):
        assert "mma" in ptx  # the rows' products on the tensor cores
    if constexprs.get("PDL"):
        # The first weight tiles are read before the wait for the kernel ahead; nothing is
        # stored before it; the next kernel may launch after it.
        wait = ptx.index("griddepcontrol.wait")
        assert "ld.global" in ptx[:wait] and "st.global" not in ptx[:wait] and "atom" not in ptx[:wait]
        assert ptx.index("griddepcontrol.launch_dependents") > wait
    else:
        assert "griddepcontrol" not in ptx


def _loop_bodies(ptx: str) -> list[list[str]]:
    """The PTX lines of each loop: the basic blocks that LLVM's loop header reaches and that reach
    it back (a rotated loop may put its latch before its header)."""
    lines = ptx.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*\$L__BB\d+_\d+:", line)]
    blocks = {lines[i].split(":")[0].strip(): (i, end) for i, end in zip(starts, starts[1:] + [len(lines)])}
    order = list(blocks)
    edges = {}
    for k, (label, (i, end)) in enumerate(blocks.items()):
        body = lines[i:end]
        targets = {t for line in body for t in re.findall(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)}
        if not any(re.search(r"^\s*(bra\.uni|ret;)", line) for line in body) and k + 1 < len(order):
            targets.add(order[k + 1])  # falls through
        edges[label] = targets

    def reach(start: str, step) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    bodies = []
    for label, (i, _) in blocks.items():
        if "Loop Header" in lines[i]:
            loop = reach(label, lambda b: edges[b]) & reach(label, lambda b: [a for a in edges if b in edges[a]])
            bodies.append([line for b in order if b in loop for line in lines[slice(*blocks[b])]])
    return bodies


def test_prepared_norm_leaves_the_consumers_loop_as_the_plain_one():
    """A GEMV after a prepared norm (NORM_PARTS) runs the plain tl.dot loop over x * g, nothing
    of the norm's in it (the norm folded into the loop, NORM, carries about 2.5 times its
    instructions); the prepared sums of squares are added in a short loop of their own."""
    def dot_loop(**fused):
        constexprs = gemv_stages(dict(GEMV, BLOCK_M=16, GATED=False, FINAL=True, HAS_BIAS=False, USE_DOT=True,
                                      LAST_SPLIT_SUMS=False, **fused))
        ptx = compile_for_hopper(gemv._gemv_kernel, constexprs, types=PREPARED, launched=GEMV_LAUNCH).asm["ptx"]
        (loop,) = [body for body in _loop_bodies(ptx) if any("mma" in line for line in body)]
        return [line for line in loop if line.strip() and not line.strip().startswith((".loc", "//", "$L"))]

    plain, prepared, folded = dot_loop(), dot_loop(NORM_PARTS=True), dot_loop(NORM=True)
    assert len(prepared) <= len(plain) + 4 < len(folded)
    assert sum("cvt" in line for line in prepared) <= sum("cvt" in line for line in plain)


@pytest.mark.parametrize("prefetch", [True, False])
def test_verify_kernel_loops_load_from_registers_when_prefetched(prefetch):
    """The fused verify kernel at SmolLM2's hybrid shape (n = 64, 8 columns, K = 3), one warp as
    it launches there: prefetched, its two sequential loops (replay, new tokens) issue no global
    load; with per-step loads, each does."""
    constexprs = dict(HAS_D=True, DT_SOFTPLUS=True, STORE_STATES=False, SHARED_BH=True, PREFETCH=prefetch,
                      BLOCK_T=4, BLOCK_N=64, BLOCK_P=8, PDL=False)
    ptx = compile_for_hopper(verify._ssd_verify_kernel, constexprs, num_warps=1).asm["ptx"]
    loops = _loop_bodies(ptx)
    assert len(loops) == 2
    loads = [sum("ld.global" in line for line in body) for body in loops]
    assert (loads == [0, 0]) if prefetch else all(n > 0 for n in loads)
