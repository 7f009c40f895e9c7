"""`mambaify bench` on the CPU: the tiny family's grid end to end through the CLI, the roofline's
byte count against a hand computation, and points that do not fit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mambaify import bench
from mambaify.cli import main as cli_main
from mambaify.convert import convert
from mambaify.generate import engine as engine_module
from mambaify.generate.engine import Engine
from tests.conftest import tiny_teacher

CPU = torch.device("cpu")
NEW_TOKENS = 4
GRID = dict(attention=(1.0, 0.5, 0.0), batches=(1, 2), contexts=(16, 64))
ARGV = [
    "bench", "--families", "tiny", "--attention", "1,0.5,0", "--batch", "1,2", "--context", "16,64",
    "--new-tokens", str(NEW_TOKENS), "--repeats", "1", "--hf-batch", "1", "--device", "cpu",
]


def tiny_family() -> dict[str, torch.nn.Module]:
    teacher = bench.build_teacher("tiny", CPU, torch.float32)
    return {bench.model_label(f): teacher if f == 1.0 else convert(teacher, attention=f) for f in GRID["attention"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run of the tiny grid, with a memory limit just below the biggest point's estimate."""
    estimates = {
        (label, batch, context): bench.estimate_memory(model, batch, context, NEW_TOKENS, torch.float32)["total"]
        for label, model in tiny_family().items() for batch in GRID["batches"] for context in GRID["contexts"]
    }
    biggest = max(estimates, key=estimates.get)
    below = max(v for k, v in estimates.items() if k != biggest)
    limit_gib = (estimates[biggest] + below) / 2 / bench.GIB
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend on a busy 2-core machine
    try:
        code = cli_main([*ARGV, "--out", str(out), "--memory-limit-gib", repr(limit_gib)])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((out / "bench.json").read_text())
    return code, out, doc, biggest


def test_tiny_grid_end_to_end_writes_json_markdown_and_plots(run):
    code, out, doc, _ = run
    assert code == 0
    points = doc["points"]
    engine = {(p["model"], p["batch"], p["context"]) for p in points if p["path"] == "engine"}
    labels = ("teacher", "hybrid-50%", "hybrid-0%")
    assert engine == {(label, b, c) for label in labels for c in GRID["contexts"] for b in GRID["batches"]}
    hf = [p for p in points if p["path"] == "hf"]
    assert [(p["model"], p["batch"], p["context"]) for p in hf] == [("teacher", 1, 16)]  # smallest context only
    for p in points:
        if p["status"] != "ok":
            continue
        assert p["decode_tok_s"] > 0 and p["ttft_ms"] > 0 and p["new_tokens"] == NEW_TOKENS
        assert p["roofline_step_ms"] is None and p.get("roofline_fraction") is None  # no CUDA: no roofline
        assert p["peak_memory_gib"] is None  # nor peak memory
        # The tiny family's embedding is untied: a step reads only the rows it gathers.
        assert p["bytes_per_step"] > p["weights_read_bytes_per_step"] > 0
        assert p["weights_read_bytes_per_step"] < p["weights_bytes"]
        if p["path"] == "engine":
            assert p["prefill_tok_s"] > 0 and p["prefill_rows"] == p["batch"] and not p["ttft_extrapolated"]
    # A hybrid's ratio is its decode speed over the teacher's at the same batch and context.
    teacher = next(p for p in points if p["model"] == "teacher" and p["path"] == "engine" and p["batch"] == 1
                   and p["context"] == 16)
    hybrid = next(p for p in points if p["model"] == "hybrid-0%" and p["batch"] == 1 and p["context"] == 16)
    assert hybrid["decode_vs_teacher"] == pytest.approx(hybrid["decode_tok_s"] / teacher["decode_tok_s"])
    assert hf[0]["engine_vs_hf"] == pytest.approx(teacher["decode_tok_s"] / hf[0]["decode_tok_s"])

    table = (out / "bench.md").read_text()
    # The hybrids' engine points name the fused conv step (the default); the teacher has no conv.
    assert "## tiny" in table and "| hybrid-50% | engine (conv in SSD step) | 2 | 16 |" in table
    assert "| teacher | engine | 1 | 16 |" in table and "Decode speed-up" in table
    for name in ("decode.png", "roofline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_point_over_the_memory_limit_is_skipped_with_its_reason(run):
    code, out, doc, biggest = run
    assert biggest == ("teacher", 2, 64)  # the most K/V and the largest prefill mask
    skipped = [p for p in doc["points"] if p["status"] == "skipped"]
    assert [(p["model"], p["batch"], p["context"]) for p in skipped] == [biggest]
    assert "needs about" in skipped[0]["reason"] and "GiB" in skipped[0]["reason"]
    assert skipped[0]["decode_vs_teacher"] is None
    hybrid = next(p for p in doc["points"] if p["model"] == "hybrid-0%" and (p["batch"], p["context"]) == (2, 64))
    assert hybrid["status"] == "ok" and hybrid["decode_vs_teacher"] is None  # no teacher point to compare with
    assert "| teacher | engine | 2 | 64 | skipped: needs about" in (out / "bench.md").read_text()


def test_roofline_bytes_equal_a_hand_computation():
    # conftest's tiny Llama: 4 layers, hidden 64, 4 heads of 16, 2 kv heads, MLP 96, vocab 97,
    # untied. At 50% attention layers 1 and 3 stay attention, 0 and 2 become Mamba2.
    model = convert(tiny_teacher("llama"), attention=0.5)
    embed = lm_head = 97 * 64
    mlp = 3 * 64 * 96
    norms = 2 * 64
    attention_layer = (64 * 64) + 2 * (64 * 32) + (64 * 64) + mlp + norms  # q, k, v, o
    # in_proj emits z (64), x (32), B (32), C (64), dt (4); the conv runs over x, B, C (128 channels).
    mamba_layer = 64 * 196 + (128 * 4 + 128) + 3 * 4 + 64 + 64 * 64 + mlp + norms  # + dt_bias, A_log, D, norm, out_proj
    weights = 4 * (embed + lm_head + 64 + 2 * attention_layer + 2 * mamba_layer)  # float32
    assert bench.weight_bytes(model) == weights == 584032

    batch, slots = 3, 20
    kv = 2 * (2 * 2 * 16 * slots * batch * 4)  # 2 layers x (K and V) x kv_heads x head_dim x slots x batch x 4 B
    conv = 128 * 3 * 4  # conv_dim x (d_conv - 1), float32 model
    ssm = 4 * 16 * 16 * 4  # heads x d_state x head_dim, float32
    mamba = 2 * (2 * batch * (conv + ssm))  # 2 layers, read and written
    shapes = bench.layer_shapes(model)
    assert bench.decode_step_bytes(weights, shapes, batch, slots, torch.float32) == weights + kv + mamba == 682336
    # A step gathers one embedding row per token: the other 97 - 3 rows of the untied table stay unread.
    unread = (97 - batch) * 64 * 4
    assert bench.unread_embedding_bytes(model, batch) == unread
    assert bench.decode_weight_bytes(model, batch) == weights - unread

    # In bf16 the K/V and conv state halve; the SSM state stays float32.
    assert bench.kv_cache_bytes(shapes, batch, slots, torch.bfloat16) == kv // 2
    assert bench.mamba_state_bytes(shapes, batch, torch.bfloat16) == 2 * batch * (conv // 2 + ssm)

    # The same formulas size the memory estimate: they match what the engine allocates.
    engine = Engine(model, max_batch_size=batch, max_length=slots)
    allocated = sum(getattr(layer, f).nbytes for layer in engine.cache.layers for f in layer.__dataclass_fields__
                    if getattr(layer, f) is not None)  # (two conv windows with the fused conv step, the default)
    conv_copies = 2 if engine_module.fused_conv_step_default() else 1
    assert allocated == bench.kv_cache_bytes(shapes, batch, slots, torch.float32) + bench.mamba_state_bytes(
        shapes, batch, torch.float32, conv_copies)
    assert bench.estimate_memory(model, batch, slots - 4, 4, torch.float32)["cache"] == allocated


@pytest.mark.parametrize("fused_conv", ["1", "0"])
def test_copy_rows_fills_the_other_rows_of_every_cache_buffer(monkeypatch, fused_conv):
    """The benchmark prefills some rows and copies them to the batch's others: every buffer along
    its batch dimension, the fused conv step's two windows (batch second) too."""
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", fused_conv)
    engine = Engine(convert(tiny_teacher("llama"), attention=0.5), max_batch_size=5, max_length=16)
    layers = engine.cache.layers
    kv = [layer for layer in layers if isinstance(layer, engine_module.KVBuffers)]
    mamba = [layer for layer in layers if isinstance(layer, engine_module.MambaBuffers)]
    assert kv and mamba and all((m.conv_windows is not None) == (fused_conv == "1") for m in mamba)

    def by_row(layer):  # (batch-first views of) what each layer keeps per row
        if isinstance(layer, engine_module.KVBuffers):
            return [layer.keys, layer.values]
        conv = layer.conv_windows.transpose(0, 1) if layer.conv_windows is not None else layer.conv_state
        return [conv, layer.ssm_state]

    torch.manual_seed(0)
    for layer in layers:
        for buffer in by_row(layer):
            buffer[:2].normal_()
    engine.cache.pad_lengths[:2] = torch.tensor([3, 1])
    bench.copy_rows(engine.cache, 2, 5)
    for buffer in [engine.cache.pad_lengths] + [b for layer in layers for b in by_row(layer)]:
        for row in range(2, 5):
            assert torch.equal(buffer[row], buffer[row % 2])


def test_prefill_halves_its_rows_until_they_fit_and_skips_when_one_row_does_not(monkeypatch):
    model = convert(tiny_teacher("llama"), attention=0.5)
    engine = Engine(model, max_batch_size=4, max_length=24)
    options = bench.BenchOptions(out="unused", repeats=1)
    clock = bench.Clock(CPU)
    prompt = torch.randint(3, 97, (4, 16))
    real_prefill = engine.stack.prefill

    def prefill_up_to(max_rows: int):
        def prefill(ids, *args, **kwargs):
            if ids.shape[0] > max_rows:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_prefill(ids, *args, **kwargs)
        return prefill

    monkeypatch.setattr(engine.stack, "prefill", prefill_up_to(1))
    rows, timing = bench.prefill_with_fallback(engine, prompt, options, clock, set())
    assert rows == 1 and len(timing["prefill_s"]) == 1 and timing["first_tokens"].shape == (1,)

    monkeypatch.setattr(engine.stack, "prefill", prefill_up_to(0))
    with pytest.raises(bench.PointSkipped, match="out of memory in the prefill of one row of 16 tokens"):
        bench.prefill_with_fallback(engine, prompt, options, clock, set())


def test_from_json_rerenders_a_report_without_measuring(run, tmp_path):
    _, out, doc, _ = run
    assert cli_main(["bench", "--out", str(tmp_path / "again"), "--from-json", str(out / "bench.json")]) == 0
    again = json.loads((tmp_path / "again" / "bench.json").read_text())
    assert again["points"] == doc["points"]
    assert (tmp_path / "again" / "bench.md").read_text().startswith("# mambaify bench")
    assert (tmp_path / "again" / "decode.png").is_file()


def test_decode_profile_groups_each_steps_time_by_kind(tmp_path):
    """benchmarks/profile_decode.py on the CPU (tiny family): one row per model, whose per-kind
    times add up to its kernel time, and kernel names sorted into the kinds the table shows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decode.py"
    module_spec = importlib.util.spec_from_file_location("profile_decode", path)
    profile_decode = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(profile_decode)

    kinds = {
        "void gemv2T_kernel_val<int, int, __nv_bfloat16>": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32": "matmul",
        "_decode_attention_split_k_kernel": "attention",
        "_ssd_step_kernel": "mamba",
        "_gated_rmsnorm_fwd_kernel": "mamba",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "inductor-fused",
        # max-autotune's batch-1 matmuls, as the H200 profile named them (session 7)
        "triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_view_14": "inductor-matmul",
        "triton_red_fused_mm_t_view_24": "inductor-matmul",
        "triton_tem_fused_mm_0": "inductor-matmul",
        "_gemv_kernel": "matmul",  # mambaify's split-K GEMV and the sum of its splits
        "_sum_splits_kernel": "matmul",
        "void at::native::index_elementwise_kernel<128, 4>": "copy/index",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
        "aten::rms_norm": "norm",
        "something_new": "other",
    }
    assert {name: profile_decode.kind_of(name) for name in kinds} == kinds

    out = tmp_path / "profile"
    assert profile_decode.main(["--out", str(out), "--family", "tiny", "--attention", "1,0", "--steps", "2",
                                "--context", "16"]) == 0
    results = json.loads((out / "profile_decode.json").read_text())
    assert [m["model"] for m in results["models"]] == ["teacher", "hybrid-0%"]
    for m in results["models"]:
        assert m["graphed_step_ms"] is None and m["roofline_ms"] is None  # no CUDA graph or roofline on the CPU
        assert m["kernels_per_step"] > 0 and m["top_kernels"]
        assert sum(m["by_kind_ms"].values()) == pytest.approx(m["kernel_ms_per_step"])
        # The matmuls' bandwidth: every linear weight (the LM head's too) over the matmul time.
        assert m["linear_weight_bytes"] > 0
        assert profile_decode.matmul_tb_per_s(m) == pytest.approx(
            m["linear_weight_bytes"] / m["by_kind_ms"]["matmul"] / 1e9)
    fused = {"linear_weight_bytes": 2e9, "by_kind_ms": {"matmul": 0.5, "inductor-matmul": 1.5, "mamba": 9.0}}
    assert profile_decode.matmul_tb_per_s(fused) == pytest.approx(2e9 / 2.0 / 1e9)
    assert "matmul TB/s" in (out / "profile_decode.md").read_text()
    gemv = tmp_path / "profile-gemv"
    assert profile_decode.main(["--out", str(gemv), "--family", "tiny", "--attention", "0", "--steps", "1",
                                "--context", "8", "--small-batch-linear"]) == 0
    assert "linear layers through the split-K GEMV" in (gemv / "profile_decode.md").read_text()
    assert results["models"][0]["by_kind_ms"].get("attention", 0) > 0  # the teacher attends ...
    assert results["models"][1]["by_kind_ms"].get("attention", 0) == 0  # ... the pure Mamba2 model does not
    assert "| teacher | 1 | 16 |" in (out / "profile_decode.md").read_text()


def test_prefill_timed_from_a_graph_where_generate_would_use_one():
    """The benchmark times a prefill as generate() runs it: from a CUDA graph for a prompt batch
    of a graphed width and at most PREFILL_GRAPH_TOKENS tokens, eagerly otherwise."""
    from types import SimpleNamespace

    from mambaify import bench
    from mambaify.generate.engine import PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_WIDTHS

    cuda = SimpleNamespace(use_cuda_graph=True, prefill_widths=PREFILL_GRAPH_WIDTHS)
    assert bench.prefill_is_graphed(cuda, 1, 1024) and bench.prefill_is_graphed(cuda, 2, 2048)
    assert not bench.prefill_is_graphed(cuda, 1, 1000)  # not a graphed width: generate would pad it
    assert not bench.prefill_is_graphed(cuda, 4, 2048)  # more tokens than a graph holds
    assert PREFILL_GRAPH_TOKENS == 4096
    assert not bench.prefill_is_graphed(SimpleNamespace(use_cuda_graph=False, prefill_widths=PREFILL_GRAPH_WIDTHS), 1, 1024)
    assert not bench.prefill_is_graphed(SimpleNamespace(use_cuda_graph=True, prefill_widths=None), 1, 1024)


def test_a_tied_embedding_is_read_whole_as_the_head():
    tied = tiny_teacher("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert bench.unread_embedding_bytes(tied, batch=2) == 0
    assert bench.decode_weight_bytes(tied, batch=2) == bench.weight_bytes(tied)


def test_split_k_attention_reads_the_slots_up_to_the_current_one():
    # 4 steps from slot 10 read 11, 12, 13 and 14 slots per row on CUDA (the split-K kernel);
    # SDPA over a mask (the CPU) reads all 14 every step.
    assert bench.engine_kv_slots_read(10, 4, torch.device("cuda")) == 12.5 == (11 + 12 + 13 + 14) / 4
    assert bench.engine_kv_slots_read(10, 4, CPU) == 14


def test_legacy_points_are_rendered_with_the_gathered_embedding_rows(tmp_path):
    # Points as recorded on the H200 before the correction (session 2's grids): a llama8b step's
    # bytes counted the whole 128256 x 4096 bf16 embedding table; re-rendering takes off all but the
    # rows a step gathers. SmolLM2 ties its table to the head: its points stay as they were.
    recorded = Path(__file__).parent.parent / "results" / "h200" / "bench"
    legacy = json.loads((recorded / "llama8b.json").read_text())["points"][0]
    tied = json.loads((recorded / "smollm2.json").read_text())["points"][0]
    assert "weights_read_bytes_per_step" not in legacy and (legacy["family"], legacy["batch"]) == ("llama8b", 1)
    merged = bench.render_from_json([recorded / "llama8b.json", recorded / "smollm2.json"], tmp_path / "merged")
    new = next(p for p in merged["points"] if p["family"] == "llama8b" and p["model"] == "teacher")
    same = next(p for p in merged["points"] if p["family"] == "smollm2" and p["model"] == tied["model"]
                and (p["batch"], p["context"], p["path"]) == (tied["batch"], tied["context"], tied["path"]))
    unread = (128256 - 1) * 4096 * 2
    assert new["bytes_per_step"] == legacy["bytes_per_step"] - unread
    assert new["weights_read_bytes_per_step"] == legacy["weights_bytes"] - unread
    ratio = new["bytes_per_step"] / legacy["bytes_per_step"]
    assert new["roofline_step_ms"] == pytest.approx(legacy["roofline_step_ms"] * ratio)
    assert new["roofline_fraction"] == pytest.approx(new["roofline_step_ms"] / legacy["decode_step_ms"])
    assert 0.93 < ratio < 0.94  # a 1 GiB table of 16 GiB of weights
    assert same["bytes_per_step"] == tied["bytes_per_step"] and same["roofline_fraction"] == tied["roofline_fraction"]
    assert any("recomputed" in n for n in merged["meta"]["notes"])
    # Rendering the merged file again changes nothing more.
    again = bench.render_from_json([tmp_path / "merged" / "bench.json"], tmp_path / "again")
    first = next(p for p in again["points"] if p["family"] == "llama8b" and p["model"] == "teacher")
    assert first["roofline_step_ms"] == pytest.approx(new["roofline_step_ms"])
    assert sum("recomputed" in n for n in again["meta"]["notes"]) == 1


def test_round_profile_lists_each_calls_kernels(tmp_path, monkeypatch):
    """benchmarks/profile_rounds.py on the CPU (tiny models): the plain step, the draft round and
    the verify round, each with per-kind times that add up to its kernel time; the verify round
    writes its K/V with index_put_ (a scatter_ costs two copies of the cache once compiled)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    profile_rounds = importlib.import_module("profile_rounds")
    out = tmp_path / "rounds"
    assert profile_rounds.main(["--out", str(out), "--tiny", "--calls", "2", "--k", "2", "--prompt-tokens", "8"]) == 0
    results = json.loads((out / "profile_rounds.json").read_text())
    assert [r["call"] for r in results["calls"]] == ["plain decode step", "draft round (K = 2)", "verify round (3 tokens)"]
    for r in results["calls"]:
        assert r["graphed_ms"] is None and "graphed" not in r  # no CUDA graph on the CPU
        eager = r["eager"]
        assert eager["kernels_per_call"] > 0
        assert sum(eager["by_kind_ms"].values()) == pytest.approx(eager["kernel_ms_per_call"])
        assert sum(k["ms_per_call"] for k in eager["kernels"]) == pytest.approx(eager["kernel_ms_per_call"])
    verify_ops = {k["name"] for k in results["calls"][2]["eager"]["kernels"]}
    assert "aten::index_put_" in verify_ops and "aten::scatter_" not in verify_ops
    assert "verify round (3 tokens), eager: costliest kernels" in (out / "profile_rounds.md").read_text()
    # The draft's LM head cut to its first rows (as (b) runs the 8B draft): a smaller head to read.
    cut = tmp_path / "cut"
    assert profile_rounds.main(["--out", str(cut), "--tiny", "--calls", "2", "--k", "2", "--prompt-tokens", "8",
                                "--draft-vocab", "16"]) == 0
    cut_results = json.loads((cut / "profile_rounds.json").read_text())
    assert "LM head cut to 16 rows" in cut_results["header"]
    assert [r["call"] for r in cut_results["calls"]] == [r["call"] for r in results["calls"]]
    # The draft's layers in int8 (--draft-int8): the same calls, said in the header.
    int8 = tmp_path / "int8"
    assert profile_rounds.main(["--out", str(int8), "--tiny", "--calls", "2", "--k", "2", "--prompt-tokens", "8",
                                "--draft-int8"]) == 0
    int8_results = json.loads((int8 / "profile_rounds.json").read_text())
    assert "its layers in int8" in int8_results["header"]
    assert [r["call"] for r in int8_results["calls"]] == [r["call"] for r in results["calls"]]
    # The 8B shapes need a GPU: refused on the CPU, with the way out named.
    assert profile_rounds.main(["--out", str(tmp_path / "big"), "--shape", "llama8b"]) == 2


def test_transformers_prefill_is_chunked_where_one_pass_would_not_fit(monkeypatch):
    """generate()'s point at a batch and context whose one-pass prefill is over the limit runs
    transformers' chunked prefill, with the largest power-of-two chunk that fits, and is timed."""
    teacher = bench.build_teacher("tiny", CPU, torch.float32)
    spec = bench.PointSpec("tiny", "teacher", 1.0, 2, 64)
    whole = bench.estimate_memory(teacher, 2, 64, NEW_TOKENS, torch.float32, 2, engine_mask=False)
    at_16 = bench.estimate_memory(teacher, 2, 64, NEW_TOKENS, torch.float32, 2, engine_mask=False, prefill_width=16)
    at_32 = bench.estimate_memory(teacher, 2, 64, NEW_TOKENS, torch.float32, 2, engine_mask=False, prefill_width=32)
    assert at_16["total"] < at_32["total"] < whole["total"]
    limit_gib = (at_16["total"] + at_32["total"]) / 2 / bench.GIB  # 32-token chunks do not fit, 16 do
    chunks = []
    real_generate = bench.hf_generate

    def spy(*args, **kwargs):
        chunks.append(args[5] if len(args) > 5 else kwargs.get("prefill_chunk"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(bench, "hf_generate", spy)
    clock = bench.Clock(CPU)
    options = bench.BenchOptions(out="unused", repeats=1, new_tokens=NEW_TOKENS, memory_limit_gib=limit_gib)
    point = bench.bench_hf_point(teacher, spec, options, CPU, torch.float32, clock, None)
    assert point["status"] == "ok" and point["prefill_chunk"] == 16 and point["decode_tok_s"] > 0
    assert set(chunks) == {16}
    assert point["estimated_memory_gib"] == pytest.approx(at_16["total"] / bench.GIB)

    # Asked for: 0 never chunks (and the point is then skipped for memory); a size is taken as is.
    never = bench.bench_hf_point(teacher, spec, dataclasses.replace(options, hf_prefill_chunk=0), CPU,
                                 torch.float32, clock, None)
    assert never["status"] == "skipped" and "needs about" in never["reason"] and never["prefill_chunk"] is None
    chunks.clear()
    fixed = bench.bench_hf_point(teacher, spec, dataclasses.replace(options, hf_prefill_chunk=8, memory_limit_gib=None),
                                 CPU, torch.float32, clock, None)
    assert fixed["status"] == "ok" and fixed["prefill_chunk"] == 8 and set(chunks) == {8}
    with pytest.raises(ValueError, match="--hf-prefill-chunk"):
        bench.BenchOptions(out="unused", hf_prefill_chunk=-1)

    # A chunk the bench chose that runs out of memory all the same (the estimate is short of what
    # generate() holds) is halved and tried again; a chunk asked for is not.
    def tight(*args, **kwargs):
        chunk = args[5] if len(args) > 5 else kwargs.get("prefill_chunk")
        chunks.append(chunk)
        if chunk > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB.")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(bench, "hf_generate", tight)
    monkeypatch.setattr(bench, "HF_MIN_CHUNK", 4)
    chunks.clear()
    retried = bench.bench_hf_point(teacher, spec, options, CPU, torch.float32, clock, None)
    assert retried["status"] == "ok" and retried["prefill_chunk"] == 8 and retried["prefill_chunks_out_of_memory"] == [16]
    assert chunks[0] == 16 and set(chunks[1:]) == {8}
    asked = bench.bench_hf_point(teacher, spec, dataclasses.replace(options, hf_prefill_chunk=16, memory_limit_gib=None),
                                 CPU, torch.float32, clock, None)
    assert asked["status"] == "skipped" and "out of memory" in asked["reason"] and asked["prefill_chunk"] == 16


def test_chunked_prefill_generates_the_tokens_of_one_pass():
    teacher = bench.build_teacher("tiny", CPU, torch.float32)
    prompt = bench.random_ids(2, 40, teacher.config.vocab_size, 0, CPU)
    whole = bench.hf_generate(teacher, prompt, 6, 48, compile_=False)
    chunked = bench.hf_generate(teacher, prompt, 6, 48, compile_=False, prefill_chunk=16)
    assert torch.equal(whole, chunked)
