"""`mambaify bench`: how fast a teacher and its hybrids generate, against the memory roofline.

For each family (the default teacher SmolLM2-135M-Instruct, or a Llama-3-8B-shaped model with
random weights) the teacher and its hybrids at the chosen attention fractions run on a grid of
batch sizes and contexts; every point records prefill tokens/s, time to first token, decode
tokens/s, peak memory and the decode step's HBM roofline. The teacher runs on its best path, our
:class:`~mambaify.generate.engine.Engine` (static cache + CUDA-graph decode serves a plain Llama
too); transformers' own ``generate`` with a static cache and ``torch.compile`` is timed for the
teacher as a reference.

How one engine point (batch B, context C, N new tokens) is measured:

* Memory is estimated first (weights + caches + a one-row prefill); a point over the limit is
  recorded as skipped with the estimate, and so is one that runs out of memory anyway.
* The engine is built for B rows and C + N slots. Its first request, a short prompt of B rows,
  captures the CUDA graph of the decode step; that time is reported apart ("capture"). With
  ``--compile`` the decode step is compiled by torch.compile first (``Engine(compile=True)``);
  the compilation is part of the capture time and also reported on its own ("compile_s"), and
  every engine point records ``compiled``: whether its step ran compiled (for a skipped point,
  whether it was asked to). A step that fails to compile is timed uncompiled, with a note.
* Prefill: the prompt is C random token ids. A pass covers at most ``--prefill-tokens`` tokens
  (whole rows): a pass over more is compute-bound and no faster per token, and the mask of the
  engine's prefill grows with C^2, so big batches time a few rows and the batch's time to first
  token is extrapolated (flagged). The first pass of a shape is an untimed warm-up; then up to
  ``--repeats`` timed passes (fewer once they add up to ``--prefill-budget-s``), median taken.
  Time to first token = prefill + picking the first token (greedy), on those rows.
* Decode: the prefilled rows are copied to the batch's other rows, the request continues at slot
  C, and N greedy decode steps (graph replay + argmax; compiled, the argmax is inside the step's
  graph: ``Engine.decode_greedy``) are timed ``--repeats`` times after a short
  warm-up, rewinding to slot C before each run; median taken.
* Timing uses CUDA events and synchronises at the end of each timed region (time.perf_counter on
  the CPU); peak memory is ``torch.cuda.max_memory_allocated`` after a reset at the point's start,
  so it includes the weights.

Roofline of a decode step: the bytes one step must move through HBM, over the bandwidth of a large
device-to-device copy measured at the start (bytes read + written): all parameters in their
dtype except the rows of an untied input embedding that the step does not gather (it reads one
row per token; a table tied to the LM head is read whole, as the head), the K/V of every
attention layer for every slot the step reads, and each Mamba layer's conv and SSM state, read
and written once (in the dtypes the engine keeps them: conv in the model dtype, SSM in float32).
Slots read: on CUDA the engine's split-K attention reads each row's slots up to the current one,
C + (N + 1) / 2 on average over N steps from slot C; elsewhere (SDPA over a mask) and in
transformers' static cache, all C + N. Fraction of roofline = roofline time / measured step time.
Points recorded before 2026-12-04 counted the whole embedding table (1 GiB of Llama-3-8B's
16 GiB; SmolLM2 ties it to the head): ``--from-json`` re-renders them with the rows corrected.

Outputs in ``--out``: bench.json (rewritten after every point, so a run cut short keeps what it
measured), bench.md (tables) and decode.png / roofline.png (written after every model).
``--from-json`` re-renders (and merges) earlier runs without measuring anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .convert import attention_layers_for, convert
from .fileio import write_json_atomic
from .generate.clock import Clock
from . import ops
from .generate.engine import (
    COMPILE_MODES, PREFILL_GRAPH_TOKENS, CompileError, Engine, StaticCache, check_small_batch_linear,
    fold_norms_default, fused_conv_step_default, prefill_width, resolve_small_batch_linear, use_split_k_attention,
)
from .models.modeling import HybridForCausalLM, Mamba2Mixer

GIB = 2**30
H200_COPY_BANDWIDTH = 4.08e12  # bytes/s, read + written: the lent H200's ceiling as measured before, for reference
FAMILIES = ("smollm2", "llama8b")  # "tiny" also exists, for tests on the CPU; it is not advertised
DEFAULT_TEACHER = "smollm2-135m-instruct"
CAPTURE_PROMPT = 8  # tokens of the short first request that triggers the graph capture
DECODE_WARMUP_STEPS = 16  # graph replays need no warm-up; a few steps settle clocks and caches


class PointSkipped(Exception):
    """A point that cannot run here; its message is the reason recorded."""


@dataclass
class BenchOptions:
    out: Path
    families: list[str] = dataclasses.field(default_factory=lambda: list(FAMILIES))
    attention: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125, 0.0])
    batches: list[int] = dataclasses.field(default_factory=lambda: [1, 16, 64])
    contexts: list[int] = dataclasses.field(default_factory=lambda: [1024, 8192, 32768])
    new_tokens: int = 128
    repeats: int = 3
    prefill_tokens: int = 32768
    prefill_budget_s: float = 5.0
    paths: list[str] = dataclasses.field(default_factory=lambda: ["engine", "hf"])
    hf_batches: list[int] = dataclasses.field(default_factory=lambda: [1, 64])
    hf_contexts: list[int] | None = None  # None: the grid's smallest context
    memory_limit_gib: float | None = None  # None: the device's memory (no limit on the CPU)
    time_budget_s: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    teacher: str = DEFAULT_TEACHER
    seed: int = 0
    compile: bool = False  # the engine's decode step through torch.compile (off: comparable to earlier runs)
    compile_mode: str = "default"  # inductor's mode with compile (COMPILE_MODES)
    # the engine's linear layers through the split-K GEMV: Engine(small_batch_linear=), "auto" as the engine
    small_batch_linear: bool | str = "auto"
    # generate()'s prefill in chunks of this many tokens (transformers' prefill_chunk_size): None
    # picks the largest power of two that fits where the whole prompt in one pass would not; 0 never chunks
    hf_prefill_chunk: int | None = None

    def __post_init__(self):
        unknown = [f for f in self.families if f not in (*FAMILIES, "tiny")]
        if unknown:
            raise ValueError(f"unknown --families {unknown}; choose from {', '.join(FAMILIES)}")
        bad = [a for a in self.attention if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"--attention fractions must be in [0, 1], got {bad}")
        if min(self.batches + self.contexts + self.hf_batches + [self.new_tokens, self.repeats], default=1) < 1:
            raise ValueError("batch sizes, contexts, --new-tokens and --repeats must be at least 1")
        if self.hf_prefill_chunk is not None and self.hf_prefill_chunk < 0:
            raise ValueError(f"--hf-prefill-chunk must be 0 (never chunk) or a number of tokens, got {self.hf_prefill_chunk}")
        check_small_batch_linear(self.small_batch_linear)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if set(self.paths) - {"engine", "hf"}:
            raise ValueError(f"--paths takes engine and/or hf, got {self.paths}")
        # Teacher first, then fewer and fewer attention layers (each hybrid converts the one before).
        self.attention = sorted(set(self.attention), reverse=True)
        self.batches, self.contexts = sorted(set(self.batches)), sorted(set(self.contexts))
        self.hf_batches = sorted(set(self.hf_batches))


def parse_list(text: str, kind: Callable[[str], float | int] = int) -> list:
    """'1,16,64' -> [1, 16, 64]; '' or 'none' -> []."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# The models: teachers of each family and their hybrids


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # what one would serve with
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@contextmanager
def materialise_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly on ``device`` in ``dtype``: an 8B model never exists as a CPU
    float32 copy (32 GB and a slow CPU initialisation) before reaching the GPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def llama8b_config():
    from transformers import LlamaConfig

    # Llama-3-8B's shape. Its 8k context is widened so 32k prompts are legal; plain RoPE costs the
    # same as Llama 3.1's scaled one.
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, pad_token_id=0,
    )


def tiny_config():
    from transformers import LlamaConfig

    # Eight layers, so that 50 / 25 / 12.5 % attention keep 4 / 2 / 1 layers.
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_teacher(family: str, device: torch.device, dtype: torch.dtype, teacher: str = DEFAULT_TEACHER,
                  seed: int = 0) -> nn.Module:
    """The family's teacher on ``device`` in ``dtype``, in eval mode."""
    if family == "smollm2":
        from .teachers import load_teacher

        model, _ = load_teacher(teacher, dtype=dtype, device=device)
        return model.eval()
    from transformers import LlamaForCausalLM

    config = llama8b_config() if family == "llama8b" else tiny_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # speed does not depend on the weights; random ones are reproducible
    with materialise_on(device, dtype):
        model = LlamaForCausalLM(config)
    return model.eval()


def attention_layers_of(model: nn.Module) -> list[int]:
    if isinstance(model, HybridForCausalLM):
        return list(model.config.attn_layers)
    return list(range(model.config.num_hidden_layers))


def model_label(fraction: float) -> str:
    return "teacher" if fraction == 1.0 else f"hybrid-{100 * fraction:g}%"


def models_of(family: str, options: BenchOptions, device: torch.device,
              dtype: torch.dtype) -> Iterator[tuple[float, nn.Module]]:
    """(fraction, model) for each attention fraction, most attention first.

    Each hybrid is converted from the model before it when its attention layers are a subset of
    that model's (true for 1 > 1/2 > 1/4 > 1/8 > 0: convert() takes a hybrid and converts more of
    its layers), so at most two models share the GPU, and only while converting. Otherwise it is
    converted from a freshly built teacher.
    """
    def build() -> nn.Module:
        return build_teacher(family, device, dtype, options.teacher, options.seed)

    current = build()
    num_layers = current.config.num_hidden_layers
    for fraction in options.attention:
        layers = attention_layers_for(num_layers, fraction)
        if fraction < 1.0 or len(layers) < num_layers:
            if not set(layers) <= set(attention_layers_of(current)):
                current = None  # let the previous model go before building the teacher again
                free_memory()
                current = build()
            with materialise_on(device, dtype):  # the hybrid is created where it will run
                hybrid = convert(current, attention=layers, seed=options.seed).eval()
            current = hybrid
            free_memory()
        yield fraction, current


# ---------------------------------------------------------------------------------------------
# Bytes: what a decode step moves (the roofline) and what a point holds (the memory estimate)


@dataclass(frozen=True)
class AttentionShape:
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MambaShape:
    conv_dim: int
    d_conv: int
    heads: int
    d_state: int
    head_dim: int


LayerShape = AttentionShape | MambaShape


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Each layer's token mixer, read from the modules as the engine reads them."""
    shapes: list[LayerShape] = []
    for layer in model.model.layers:
        mixer = getattr(layer, "mamba", None)
        if isinstance(mixer, Mamba2Mixer):
            shapes.append(MambaShape(mixer.conv_dim, mixer.d_conv, mixer.num_heads, mixer.d_state, mixer.head_dim))
        else:
            attention = layer.self_attn
            shapes.append(AttentionShape(attention.k_proj.out_features // attention.head_dim, attention.head_dim))
    return shapes


def weight_bytes(model: nn.Module) -> int:
    """All parameters in their dtype; tied weights count once (parameters() yields them once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def unread_embedding_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of the input embedding table that a decode step of ``batch`` rows does not read: the
    lookup gathers one row per token, so the rest of an untied table stays in HBM unread. A table
    tied to the LM head is read whole by the head: nothing is left unread."""
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == table.data_ptr():
        return 0
    return _unread_rows_bytes(table.shape[0], table[0].numel(), table.element_size(), batch)


def _unread_rows_bytes(rows: int, width: int, itemsize: int, batch: int) -> int:
    """An embedding table's bytes outside the ``batch`` rows a decode step gathers."""
    return max(rows - batch, 0) * width * itemsize


def decode_weight_bytes(model: nn.Module, batch: int) -> int:
    """The weights one decode step of ``batch`` rows reads: every parameter once, but only the
    gathered rows of an untied input embedding."""
    return weight_bytes(model) - unread_embedding_bytes(model, batch)


def engine_kv_slots_read(context: int, new_tokens: int, device: torch.device) -> float:
    """Mean K/V slots per row that the engine's decode steps read over ``new_tokens`` steps from
    slot ``context``: the split-K kernel (CUDA) reads the slots up to the current one, SDPA over a
    mask reads every slot of the cache."""
    if use_split_k_attention(device):
        return context + (new_tokens + 1) / 2
    return context + new_tokens


def kv_cache_bytes(shapes: Sequence[LayerShape], batch: int, slots: float, dtype: torch.dtype) -> int:
    """Keys and values of every attention layer: 2 * kv_heads * head_dim * slots * batch * itemsize
    (``slots`` may be a mean over steps)."""
    itemsize = dtype.itemsize
    return round(sum(2 * s.kv_heads * s.head_dim * slots * batch * itemsize
                     for s in shapes if isinstance(s, AttentionShape)))


def mamba_state_bytes(shapes: Sequence[LayerShape], batch: int, dtype: torch.dtype, conv_copies: int = 1) -> int:
    """Conv state (conv_dim x (d_conv - 1), model dtype; ``conv_copies`` of it: 2 where the engine
    double-buffers the window for its fused conv step) and SSM state (heads x d_state x
    head_dim, float32, as the engine keeps it) of every Mamba layer. A decode step reads one copy
    and writes one whatever the number."""
    ssm_itemsize = torch.promote_types(dtype, torch.float32).itemsize
    return sum(
        batch * (conv_copies * s.conv_dim * (s.d_conv - 1) * dtype.itemsize
                 + s.heads * s.d_state * s.head_dim * ssm_itemsize)
        for s in shapes if isinstance(s, MambaShape)
    )


def decode_step_bytes(weights: int, shapes: Sequence[LayerShape], batch: int, slots: float, dtype: torch.dtype) -> int:
    """HBM traffic of one decode step: the weights it reads (``decode_weight_bytes``), the K/V of
    every slot the step reads, and the Mamba states read and written."""
    return weights + kv_cache_bytes(shapes, batch, slots, dtype) + 2 * mamba_state_bytes(shapes, batch, dtype)


def prefill_scratch_bytes(model: nn.Module, shapes: Sequence[LayerShape], rows: int, width: int,
                          dtype: torch.dtype, engine_mask: bool = True) -> int:
    """A rough lower bound on a prefill's temporary memory (out-of-memory is still caught).

    Activations: a few hidden-wide and three MLP-wide tensors per token. The engine's attention
    mask is materialised per query and key: the (rows, t, s) bool mask and its pieces, then per
    layer the mask repeated for the query heads of a group and SDPA's additive copy of it
    (2 bytes each) -- quadratic in the context, which is what limits long prefills.
    """
    config = model.config
    activations = rows * width * (6 * config.hidden_size + 3 * config.intermediate_size) * dtype.itemsize
    attention = [s for s in shapes if isinstance(s, AttentionShape)]
    if not (engine_mask and attention):
        return activations
    group = max(config.num_attention_heads // s.kv_heads for s in attention)
    return activations + rows * width * width * (4 + 3 * group)


def estimate_memory(model: nn.Module, batch: int, context: int, new_tokens: int, dtype: torch.dtype,
                    prefill_rows: int = 1, engine_mask: bool = True, prefill_width: int | None = None) -> dict[str, int]:
    """Bytes a point needs at least: weights, its caches (C + N slots), and a prefill of
    ``prefill_rows`` rows of ``prefill_width`` tokens (default: the whole context) at a time."""
    shapes = layer_shapes(model)
    weights = weight_bytes(model)
    conv_copies = 2 if fused_conv_step_default() else 1
    cache = (kv_cache_bytes(shapes, batch, context + new_tokens, dtype)
             + mamba_state_bytes(shapes, batch, dtype, conv_copies))
    width = context if prefill_width is None else min(prefill_width, context)
    scratch = prefill_scratch_bytes(model, shapes, prefill_rows, width, dtype, engine_mask)
    return {"weights": weights, "cache": cache, "prefill_scratch": scratch, "total": weights + cache + scratch}


def memory_limit_bytes(options: BenchOptions, device: torch.device) -> int | None:
    if options.memory_limit_gib is not None:
        return int(options.memory_limit_gib * GIB)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return None


# ---------------------------------------------------------------------------------------------
# Timing


def measure_copy_bandwidth(device: torch.device, nbytes: int = GIB, repeats: int = 20) -> float | None:
    """Bytes/s of a device-to-device copy, counting bytes read + written; None on the CPU.
    1 GiB is far beyond the 60 MB L2, so this is HBM's practical ceiling."""
    if device.type != "cuda":
        return None
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    clock = Clock(device)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(repeats):
        start = clock.mark()
        target.copy_(source)
        times.append(clock.seconds(start, clock.mark()))
    del source, target
    free_memory()
    return 2 * nbytes / statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def random_ids(rows: int, width: int, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    # Random ids: prefill and decode cost do not depend on which tokens they are.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (rows, width), generator=generator).to(device)


def oom_message(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------
# One engine point


@dataclass
class PointSpec:
    family: str
    label: str
    fraction: float
    batch: int
    context: int


def new_point(spec: PointSpec, model: nn.Module | None, path: str, dtype: torch.dtype, slots: float,
              bandwidth: float | None, compiled: bool = False, decode_linear: str | None = None) -> dict:
    """The fields every point has, the decode step's bytes among them (None without a model: a
    point that was never reached). ``slots``: the K/V slots a decode step reads per row (a mean
    over the steps). ``compiled``: the engine's step through torch.compile (as asked until
    measured). ``decode_linear``: "split-K" where the engine ran its linear layers through
    ``ops.small_batch_linear`` ("split-K + norms" with the norms folded into them, fold_norms),
    else None."""
    point = {
        "family": spec.family, "model": spec.label, "attention": spec.fraction, "path": path,
        "compiled": compiled, "decode_linear": decode_linear,
        "batch": spec.batch, "context": spec.context, "dtype": str(dtype).removeprefix("torch."),
        "status": "ok", "reason": None, "kv_slots_read": slots,
        "attention_layers": None, "layers": None, "weights_bytes": None, "weights_read_bytes_per_step": None,
        "kv_bytes_per_step": None, "mamba_state_bytes_per_step": None, "bytes_per_step": None,
        "roofline_step_ms": None,
    }
    if model is not None:
        shapes = layer_shapes(model)
        weights_read = decode_weight_bytes(model, spec.batch)
        step_bytes = decode_step_bytes(weights_read, shapes, spec.batch, slots, dtype)
        point.update(
            attention_layers=sum(isinstance(s, AttentionShape) for s in shapes), layers=len(shapes),
            weights_bytes=weight_bytes(model), weights_read_bytes_per_step=weights_read,
            kv_bytes_per_step=kv_cache_bytes(shapes, spec.batch, slots, dtype),
            mamba_state_bytes_per_step=2 * mamba_state_bytes(shapes, spec.batch, dtype), bytes_per_step=step_bytes,
            roofline_step_ms=step_bytes / bandwidth * 1e3 if bandwidth else None,
        )
    return point


def new_engine_point(spec: PointSpec, model: nn.Module | None, options: BenchOptions, device: torch.device,
                     dtype: torch.dtype, bandwidth: float | None) -> dict:
    """:func:`new_point` for an engine point run with ``options`` on ``device``."""
    slots = engine_kv_slots_read(spec.context, options.new_tokens, device)
    split_k = resolve_small_batch_linear(options.small_batch_linear, model, device)
    # The engine folds the Llama family's norms into the split-K GEMVs (unless MAMBAIFY_FOLD_NORMS=0).
    linear = ("split-K + norms" if fold_norms_default() else "split-K") if split_k else None
    point = new_point(spec, model, "engine", dtype, slots, bandwidth, options.compile, linear)
    # The conv step inside the SSD step's kernel (unless MAMBAIFY_FUSED_CONV_STEP=0), where there is one.
    if fused_conv_step_default() and model is not None and any(isinstance(s, MambaShape) for s in layer_shapes(model)):
        point["fused_conv_step"] = True
    return point


def skip(point: dict, reason: str) -> dict:
    point.update(status="skipped", reason=reason)
    return point


def bench_engine_point(model: nn.Module, spec: PointSpec, options: BenchOptions, device: torch.device,
                       dtype: torch.dtype, clock: Clock, bandwidth: float | None, warmed: set) -> dict:
    point = new_engine_point(spec, model, options, device, dtype, bandwidth)
    estimate = estimate_memory(model, spec.batch, spec.context, options.new_tokens, dtype)
    point["estimated_memory_gib"] = estimate["total"] / GIB
    limit = memory_limit_bytes(options, device)
    if limit is not None and estimate["total"] > limit:
        return skip(point, (
            f"needs about {estimate['total'] / GIB:.1f} GiB (weights {estimate['weights'] / GIB:.1f}, caches "
            f"{estimate['cache'] / GIB:.1f}, one-row prefill {estimate['prefill_scratch'] / GIB:.1f}) > "
            f"{limit / GIB:.1f} GiB"))
    reset_peak_memory(device)
    reason = None
    try:
        point.update(measure_engine(model, spec, options, device, clock, warmed))
    except PointSkipped as skipped:
        reason = str(skipped)
    # Out of the handler nothing references the point's engine any more: its caches can go.
    free_memory()
    if reason is not None:
        return skip(point, reason)
    point["peak_memory_gib"] = peak_memory_gib(device)
    if point["roofline_step_ms"] is not None:
        point["roofline_fraction"] = point["roofline_step_ms"] / point["decode_step_ms"]
    return point


def without_oom(run: Callable, what: str):
    """run(), turning running out of device memory into a skipped point."""
    try:
        return run()
    except torch.OutOfMemoryError as err:
        message = oom_message(err)
    # Raised outside the handler so the failed call's tensors are not kept alive by its traceback.
    raise PointSkipped(f"out of memory {what}: {message}")


def measure_engine(model: nn.Module, spec: PointSpec, options: BenchOptions, device: torch.device,
                   clock: Clock, warmed: set) -> dict:
    batch, context, steps = spec.batch, spec.context, options.new_tokens
    vocab = model.config.vocab_size

    def build(compile_: bool) -> Engine:
        return without_oom(lambda: Engine(model, max_batch_size=batch, max_length=context + steps, compile=compile_,
                                          compile_mode=options.compile_mode,
                                          small_batch_linear=options.small_batch_linear), "allocating the caches")

    # The first request of a batch size captures the decode graph (and runs it twice), compiling
    # the step first with --compile: time it apart with a short prompt, before the real prefill
    # (the capture writes into the cache).
    short = random_ids(batch, min(CAPTURE_PROMPT, context), vocab, options.seed + 1, device)
    engine = build(options.compile)
    compile_error = None
    start = clock.mark()
    try:
        without_oom(lambda: engine.prefill(short), "capturing the decode step")
    except CompileError as err:
        compile_error = str(err)
    if compile_error is not None:  # outside the handler: the failed engine's caches can go first
        engine = None
        free_memory()
        engine = build(False)
        start = clock.mark()
        without_oom(lambda: engine.prefill(short), "capturing the decode step")
    capture_s = clock.seconds(start, clock.mark())

    rows = min(batch, max(1, options.prefill_tokens // context))
    prompt = random_ids(rows, context, vocab, options.seed, device)
    rows, prefill = prefill_with_fallback(engine, prompt, options, clock, warmed)

    # Decode continues from slot C in every row: the other rows get copies of the prefilled ones.
    copy_rows(engine.cache, rows, batch)
    first_tokens = prefill["first_tokens"].repeat(math.ceil(batch / rows))[:batch]
    decode_s = without_oom(lambda: time_decode(engine, first_tokens, context, steps, options.repeats, clock),
                           "decoding")

    prefill_s, ttft_s = statistics.median(prefill["prefill_s"]), statistics.median(prefill["ttft_s"])
    passes = math.ceil(batch / rows)  # sequential passes of `rows` rows would prefill the batch
    decode_median = statistics.median(decode_s)
    return {
        "capture_s": capture_s, "compiled": engine.is_compiled(batch), "compile_s": engine.compile_seconds,
        "compile_mode": options.compile_mode if engine.is_compiled(batch) else None, "compile_error": compile_error,
        "prefill_rows": rows, "prefill_ms": prefill_s * 1e3, "prefill_tok_s": rows * context / prefill_s,
        "prefill_repeats_ms": [t * 1e3 for t in prefill["prefill_s"]],
        "ttft_ms": (passes * prefill_s + ttft_s - prefill_s) * 1e3, "ttft_extrapolated": passes > 1,
        "ttft_rows_ms": ttft_s * 1e3, "prefill_graphed": prefill["graphed"],
        "new_tokens": steps, "decode_step_ms": decode_median / steps * 1e3,
        "decode_tok_s": batch * steps / decode_median, "decode_repeats_ms": [t * 1e3 for t in decode_s],
    }


def prefill_with_fallback(engine: Engine, prompt: torch.Tensor, options: BenchOptions, clock: Clock,
                          warmed: set) -> tuple[int, dict]:
    """Time the prefill of the prompt's rows, halving the rows per pass while they do not fit."""
    rows, context = prompt.shape
    while True:
        try:
            return rows, time_prefill(engine, prompt[:rows], options, clock, warmed)
        except torch.OutOfMemoryError:
            pass
        free_memory()  # outside the handler: the failed pass's activations are unreferenced now
        if rows == 1:
            raise PointSkipped(f"out of memory in the prefill of one row of {context} tokens")
        rows //= 2


@torch.no_grad()
def time_prefill(engine: Engine, prompt: torch.Tensor, options: BenchOptions, clock: Clock, warmed: set) -> dict:
    """Prefill passes straight into the engine's cache rows (what Engine.prefill runs, without
    ending the request the capture started). The first pass of a (rows, width) shape warms up.
    A shape that ``generate`` would prefill from a CUDA graph (:func:`prefill_is_graphed`) is
    timed as such, its capture in the warm-up; ``graphed`` says which."""
    rows, width = prompt.shape
    cache = engine.cache.rows(rows)
    mask = torch.ones_like(prompt)

    def run(ids: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        return engine.stack.prefill(ids, ids_mask, cache)

    graphed = prefill_is_graphed(engine, rows, width)

    def prefill() -> torch.Tensor:
        return engine.graphed_prefill((rows, width), run, prompt, mask) if graphed else run(prompt, mask)

    if (rows, width) not in warmed:
        prefill()
        warmed.add((rows, width))
    graphed = graphed and engine.prefill_error is None  # a failed capture prefills eagerly
    prefill_s: list[float] = []
    ttft_s: list[float] = []
    while not prefill_s or (len(prefill_s) < options.repeats and sum(prefill_s) < options.prefill_budget_s):
        start = clock.mark()
        logits = prefill()
        prefilled = clock.mark()
        first_tokens = logits[:, -1].argmax(-1)  # greedy: the first new token of each row
        sampled = clock.mark()
        prefill_s.append(clock.seconds(start, prefilled))
        ttft_s.append(clock.seconds(start, sampled))
    return {"prefill_s": prefill_s, "ttft_s": ttft_s, "first_tokens": first_tokens, "graphed": graphed}


def prefill_is_graphed(engine: Engine, rows: int, width: int) -> bool:
    """Whether ``engine.generate`` prefills a (rows, width) prompt from a CUDA graph without
    padding it (the benchmark's prompts are exactly as wide as their context): generate's own
    choice of width, with no room to pad."""
    return engine.use_cuda_graph and prefill_width(engine.prefill_widths, rows, width, room=width) is not None


def copy_rows(cache: StaticCache, rows: int, batch: int) -> None:
    """Fill rows [rows, batch) of every cache buffer with copies of rows [0, rows)."""
    buffers = [cache.pad_lengths]
    for layer in cache.layers:
        buffers += layer.by_row()
    for buffer in buffers:
        for start in range(rows, batch, rows):
            n = min(rows, batch - start)
            buffer[start:start + n].copy_(buffer[:n])


@torch.no_grad()
def time_decode(engine: Engine, first_tokens: torch.Tensor, context: int, steps: int, repeats: int,
                clock: Clock) -> list[float]:
    """Seconds for ``steps`` greedy decode steps from slot ``context``, ``repeats`` times."""
    request = engine._request  # the engine has no public rewind; see rewind() below

    def rewind() -> None:
        # Every run decodes slots C .. C+steps-1 again: the first C slots keep the prefilled
        # context and the later ones are overwritten, so each run is what a fresh request at
        # context C computes (the Mamba states just move on, at the same cost).
        request.next_slot = context

    def run(n: int) -> None:
        tokens = first_tokens
        for _ in range(n):
            tokens = engine.decode_greedy(tokens)

    rewind()
    run(min(steps, DECODE_WARMUP_STEPS))
    times = []
    for _ in range(repeats):
        rewind()
        start = clock.mark()
        run(steps)
        times.append(clock.seconds(start, clock.mark()))
    return times


# ---------------------------------------------------------------------------------------------
# transformers' generate with a static cache (+ torch.compile on CUDA): the reference point


def hf_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, max_cache_len: int,
                compile_: bool, prefill_chunk: int | None = None) -> torch.Tensor:
    """Greedy generate() of exactly ``new_tokens`` tokens into a static cache of a fixed length
    (a length that changes would recompile). On CUDA, transformers compiles the decoding forward
    itself when the cache is static (inductor, "reduce-overhead": CUDA graphs); the prefill stays
    eager unless ``prefill_chunk`` splits it (transformers' own chunked prefill)."""
    chunking = {} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, cache_implementation="static", max_cache_len=max_cache_len,
        disable_compile=not compile_, pad_token_id=0, **chunking,
    )


HF_MIN_CHUNK = 256  # the smallest prefill chunk a point retries with after running out of memory


def hf_prefill_chunk(model: nn.Module, spec: PointSpec, options: BenchOptions, dtype: torch.dtype,
                     limit: int | None) -> tuple[int | None, dict[str, int]]:
    """The chunk generate()'s prefill runs in (None: the whole prompt in one pass) and the memory
    estimate with it. A long prompt of a large batch in one pass needs tens of GiB of activations
    (batch 64 x 8k at the 8B shape: about 66 GiB beside the cache), which transformers avoids with
    its chunked prefill; the decode step, the point's measure, is the same either way."""
    steps = options.new_tokens

    def estimate(chunk: int) -> dict[str, int]:
        return estimate_memory(model, spec.batch, spec.context, steps, dtype, spec.batch, engine_mask=False,
                               prefill_width=chunk)

    whole = estimate(spec.context)
    if options.hf_prefill_chunk is not None:
        if options.hf_prefill_chunk == 0 or options.hf_prefill_chunk >= spec.context:
            return None, whole
        return options.hf_prefill_chunk, estimate(options.hf_prefill_chunk)
    if limit is None or whole["total"] <= limit:
        return None, whole
    chunk = 1 << (spec.context - 1).bit_length() - 1  # the largest power of two below the context
    while chunk > 16 and estimate(chunk)["total"] > limit:
        chunk //= 2
    return chunk, estimate(chunk)


def bench_hf_point(model: nn.Module, spec: PointSpec, options: BenchOptions, device: torch.device,
                   dtype: torch.dtype, clock: Clock, bandwidth: float | None) -> dict:
    steps = options.new_tokens
    slots = spec.context + steps
    point = new_point(spec, model, "hf", dtype, slots, bandwidth, compiled=device.type == "cuda")
    limit = memory_limit_bytes(options, device)
    chunk, estimate = hf_prefill_chunk(model, spec, options, dtype, limit)
    point["estimated_memory_gib"] = estimate["total"] / GIB
    point["prefill_chunk"] = chunk
    if limit is not None and estimate["total"] > limit:
        return skip(point, f"needs about {estimate['total'] / GIB:.1f} GiB > {limit / GIB:.1f} GiB")
    # A static cache sized by an earlier, longer call would be reused (transformers keeps its
    # length on the model to avoid recompiling): start each point from its own length.
    if hasattr(model, "_previous_max_cache_length"):
        del model._previous_max_cache_length
    reset_peak_memory(device)
    prompt = random_ids(spec.batch, spec.context, model.config.vocab_size, options.seed, device)
    compile_ = device.type == "cuda"
    while True:
        reason = None
        try:
            point.update(measure_hf(model, prompt, steps, slots, options.repeats, clock, compile_, chunk))
        except PointSkipped as skipped:
            reason = str(skipped)
        free_memory()
        # The estimate can be short of what generate() holds (on the H200, 64 x 8k at the 8B shape
        # ran out of memory with chunks of 4,096 that the estimate let through, and ran with
        # 2,048): a chunk the bench chose itself is halved and tried again, down to HF_MIN_CHUNK.
        chosen = options.hf_prefill_chunk is None and chunk is not None
        if reason is None or not reason.startswith("out of memory") or not chosen or chunk // 2 < HF_MIN_CHUNK:
            break
        chunk //= 2
        point["prefill_chunk"] = chunk
        point.setdefault("prefill_chunks_out_of_memory", []).append(chunk * 2)
    if reason is not None:
        return skip(point, reason)
    point["peak_memory_gib"] = peak_memory_gib(device)
    if point["roofline_step_ms"] is not None:
        point["roofline_fraction"] = point["roofline_step_ms"] / point["decode_step_ms"]
    return point


def measure_hf(model: nn.Module, prompt: torch.Tensor, steps: int, slots: int, repeats: int, clock: Clock,
               compile_: bool, prefill_chunk: int | None = None) -> dict:
    """Time to first token = generate(1 token); decode = generate(1 + steps) minus that, medians.
    The warm-up (compilation and graph recording included) is timed apart."""
    batch, context = prompt.shape
    result: dict = {"compiled": compile_, "compile_error": None}

    def warm_up() -> float:
        start = clock.mark()
        hf_generate(model, prompt, 1 + steps, slots, compile_, prefill_chunk)
        hf_generate(model, prompt, 1, slots, compile_, prefill_chunk)
        return clock.seconds(start, clock.mark())

    error = None
    try:
        result["warmup_s"] = without_oom(warm_up, "in transformers' generate")
    except PointSkipped:
        raise
    except Exception as err:  # torch.compile failing on this stack: record it, time the eager static path
        if not compile_:
            raise
        error = f"{type(err).__name__}: {oom_message(err)}"
    if error is not None:  # outside the handler, so the failed attempt's memory can be freed first
        result.update(compiled=False, compile_error=error)
        compile_ = False  # warm_up() and timed() read it when called
        torch._dynamo.reset()
        free_memory()
        result["warmup_s"] = without_oom(warm_up, "in transformers' generate")

    def timed(new_tokens: int) -> list[float]:
        times = []
        for _ in range(repeats):
            start = clock.mark()
            hf_generate(model, prompt, new_tokens, slots, compile_, prefill_chunk)
            times.append(clock.seconds(start, clock.mark()))
        return times

    first = without_oom(lambda: timed(1), "in transformers' generate")
    full = without_oom(lambda: timed(1 + steps), "in transformers' generate")
    ttft_s = statistics.median(first)
    decode_s = max(statistics.median(full) - ttft_s, 1e-9)
    result.update(
        prefill_rows=batch, ttft_ms=ttft_s * 1e3, ttft_extrapolated=False, ttft_repeats_ms=[t * 1e3 for t in first],
        generate_repeats_ms=[t * 1e3 for t in full], new_tokens=steps, decode_step_ms=decode_s / steps * 1e3,
        decode_tok_s=batch * steps / decode_s,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Results: ratios, JSON, Markdown, plots


def add_ratios(points: list[dict]) -> None:
    """decode_vs_teacher: a hybrid's decode tokens/s over the teacher's (engine, compiled alike) at
    the same batch and context; on transformers' points, engine_vs_hf: the teacher's engine
    (uncompiled where both were run) over generate()."""
    # The teacher has no Mamba layer: the conv-step switch does not change it.
    teacher = {
        (p["family"], p["batch"], p["context"], engine_variant(p)[:2]): p["decode_tok_s"]
        for p in points if p["path"] == "engine" and p["attention"] == 1.0 and p["status"] == "ok"
    }
    for p in points:
        key = (p["family"], p["batch"], p["context"])
        if p["path"] == "engine":
            base = teacher.get((*key, engine_variant(p)[:2]))
        else:
            base = teacher.get((*key, (None, None)), teacher.get((*key, ("default", None))))
        ok = p["status"] == "ok" and base is not None
        if p["path"] == "engine":
            p["decode_vs_teacher"] = p["decode_tok_s"] / base if ok else None
        else:
            p["engine_vs_hf"] = base / p["decode_tok_s"] if ok else None


class Results:
    """The document of a run, written to ``out`` as it grows."""

    def __init__(self, out: Path, meta: dict, points: list[dict] | None = None):
        self.out = out
        self.doc = {"meta": meta, "points": points or []}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def points(self) -> list[dict]:
        return self.doc["points"]

    def add(self, point: dict) -> None:
        self.points.append(point)
        add_ratios(self.points)
        write_json_atomic(self.out / "bench.json", self.doc)
        print(progress_line(point, len(self.points)), flush=True)

    def render(self) -> None:
        add_ratios(self.points)
        write_json_atomic(self.out / "bench.json", self.doc)
        (self.out / "bench.md").write_text(markdown(self.doc))
        plot(self.doc, self.out)


def compile_key(p: dict) -> str | None:
    """None for an uncompiled engine point, else its inductor mode (points of runs before
    --compile-mode were compiled in the default mode)."""
    return (p.get("compile_mode") or "default") if p.get("compiled") else None


def engine_variant(p: dict) -> tuple[str | None, str | None, bool]:
    """What makes engine points comparable: the compile mode (None: uncompiled), the linear
    layers' kernel (None: the modules' own) and whether the conv step ran inside the SSD step."""
    return compile_key(p), p.get("decode_linear"), bool(p.get("fused_conv_step"))


def _compiled_suffix(p: dict) -> str:
    mode, linear, fused_conv = engine_variant(p)
    parts = ([] if mode is None else ["compiled"] if mode == "default" else ["compiled", mode])
    if linear:
        kernel, _, folded = linear.partition(" + ")
        parts += [f"{kernel} linear"] + (["norms folded"] if folded else [])
    parts += ["conv in SSD step"] if fused_conv else []
    return f" ({', '.join(parts)})" if parts else ""


def path_label(p: dict) -> str:
    """engine / engine (compiled) / engine (compiled, MODE) / engine (..., split-K linear) / hf /
    hf (eager): the path, whether (and how) it ran compiled, and its linear layers' kernel."""
    if p["path"] == "engine":
        return "engine" + _compiled_suffix(p)
    return "hf" if p.get("compiled", True) else "hf (eager)"


def progress_line(p: dict, index: int) -> str:
    head = f"[{index}] {p['family']} {p['model']} {path_label(p)} b={p['batch']} ctx={p['context']}:"
    if p["status"] != "ok":
        return f"{head} skipped ({p['reason']})"
    parts = []
    if "prefill_tok_s" in p:
        parts.append(f"prefill {p['prefill_tok_s']:,.0f} tok/s")
    parts.append(f"TTFT {p['ttft_ms']:,.1f} ms{' (extrapolated)' if p['ttft_extrapolated'] else ''}")
    parts.append(f"decode {p['decode_tok_s']:,.0f} tok/s ({p['decode_step_ms']:.2f} ms/step")
    if p.get("roofline_fraction") is not None:
        parts[-1] += f"; roofline {p['roofline_step_ms']:.2f} ms = {100 * p['roofline_fraction']:.0f}%"
    parts[-1] += ")"
    if p.get("decode_vs_teacher") is not None and p["attention"] < 1.0:
        parts.append(f"{p['decode_vs_teacher']:.2f}x teacher")
    if p.get("peak_memory_gib") is not None:
        parts.append(f"peak {p['peak_memory_gib']:.1f} GiB")
    return f"{head} " + ", ".join(parts)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(doc: dict) -> str:
    meta, points = doc["meta"], doc["points"]
    lines = ["# mambaify bench", ""]
    bandwidth = meta.get("copy_bandwidth")
    lines += [
        f"Device: {meta.get('device')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
        f"dtype {meta.get('dtype')}; {meta.get('new_tokens')} decode steps, median of {meta.get('repeats')} repeats; "
        f"prefill passes of at most {meta.get('prefill_tokens')} prompt tokens; "
        f"SSD scan backend {meta.get('ssd_backend')}.",
        "",
        (f"Copy bandwidth measured {bandwidth / 1e12:.2f} TB/s (bytes read + written; H200 reference "
         f"{H200_COPY_BANDWIDTH / 1e12:.2f} TB/s). Roofline = bytes a decode step moves (the weights it reads, "
         "of an untied input embedding only the rows it gathers, + K/V of every slot read + Mamba states read "
         "and written) / that bandwidth." if bandwidth else
         "No CUDA device: times from time.perf_counter; no peak memory, no roofline."),
        "",
        "TTFT marked ~ is extrapolated from a pass over fewer rows (the batch would need several such passes); "
        "(graph): the prefill replayed from a CUDA graph, as generate() runs a prompt batch of at most "
        f"{PREFILL_GRAPH_TOKENS} tokens; (chunks of N): generate()'s prefill in chunks of N tokens "
        "(transformers' prefill_chunk_size), where one pass would not fit the memory. "
        "Engine = mambaify's Engine (static cache, CUDA-graph decode on CUDA); engine (compiled) = the same "
        "with its decode step compiled by torch.compile before the capture (--compile); hf = transformers' "
        "generate, static cache, torch.compile'd decode on CUDA. Setup = graph capture incl. compilation "
        "(engine) or warm-up incl. compilation (hf), excluded from the timings.",
        "",
    ]
    for family in dict.fromkeys(p["family"] for p in points):
        rows = [p for p in points if p["family"] == family]
        lines += [f"## {family}", "", *_family_table(rows), "", *_speedup_table(rows), ""]
    notes = meta.get("notes") or []
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _family_table(rows: list[dict]) -> list[str]:
    columns = ["model", "path", "batch", "context", "prefill tok/s", "TTFT ms", "decode tok/s", "x teacher",
               "step ms", "roofline ms", "% roofline", "peak GiB", "setup s"]
    out = ["| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * (len(columns) - 2)]
    for p in rows:
        cells = [p["model"], path_label(p), str(p["batch"]), str(p["context"])]
        if p["status"] != "ok":
            cells += [f"skipped: {p['reason']}"] + [""] * (len(columns) - len(cells) - 1)
        else:
            fraction = p.get("roofline_fraction")
            cells += [
                _fmt(p.get("prefill_tok_s"), ",.0f"),
                ("~" if p.get("ttft_extrapolated") else "") + f"{p['ttft_ms']:,.1f}"
                + (" (graph)" if p.get("prefill_graphed") else "")
                + (f" (chunks of {p['prefill_chunk']:,})" if p.get("prefill_chunk") else ""),
                f"{p['decode_tok_s']:,.0f}",
                _fmt(p.get("decode_vs_teacher"), ".2f"),
                f"{p['decode_step_ms']:.2f}",
                _fmt(p.get("roofline_step_ms"), ".2f"),
                _fmt(None if fraction is None else 100 * fraction, ".0f"),
                _fmt(p.get("peak_memory_gib"), ".1f"),
                _fmt(p.get("capture_s", p.get("warmup_s")), ".1f"),
            ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _speedup_table(rows: list[dict]) -> list[str]:
    """Hybrid decode tokens/s over the teacher's, one column per (batch, context)."""
    hybrids = [p for p in rows if p["path"] == "engine" and p["attention"] < 1.0]
    if not hybrids:
        return []
    cells = sorted({(p["context"], p["batch"]) for p in hybrids})
    out = ["Decode speed-up over the teacher (engine, same batch and context, compiled alike):", "",
           "| model | " + " | ".join(f"b{b} / {c}" for c, b in cells) + " |",
           "| --- |" + " ---: |" * len(cells)]
    for label in dict.fromkeys(_series_label(p) for p in hybrids):
        by_cell = {(p["context"], p["batch"]): p.get("decode_vs_teacher") for p in hybrids if _series_label(p) == label}
        out.append(f"| {label} | " + " | ".join(_fmt(by_cell.get(cell), ".2f") for cell in cells) + " |")
    return out


def _series_label(p: dict) -> str:
    return p["model"] + (_compiled_suffix(p) if p["path"] == "engine" else "")


def plot(doc: dict, out: Path) -> None:
    """decode.png: decode tokens/s against batch, one panel per family and context, a line per
    model; roofline.png: the fraction of the roofline reached, same layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in doc["points"] if p["status"] == "ok"]
    for name, key, ylabel, log in (
        ("decode.png", "decode_tok_s", "decode tokens/s", True),
        ("roofline.png", "roofline_fraction", "fraction of HBM roofline", False),
    ):
        shown = [p for p in points if p.get(key) is not None]
        families = list(dict.fromkeys(p["family"] for p in shown))
        contexts = sorted({p["context"] for p in shown})
        if not shown:
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, f"no {ylabel} measured (no CUDA device)", ha="center", va="center")
        else:
            fig, axes = plt.subplots(len(families), len(contexts), squeeze=False,
                                     figsize=(4.2 * len(contexts), 3.4 * len(families)))
            for i, family in enumerate(families):
                for j, context in enumerate(contexts):
                    _plot_panel(axes[i][j], [p for p in shown if p["family"] == family and p["context"] == context],
                                key, log)
                    axes[i][j].set_title(f"{family}, context {context}", fontsize=9)
                    axes[i][j].set_xlabel("batch")
                    axes[i][j].set_ylabel(ylabel)
            handles, labels = axes[0][0].get_legend_handles_labels()
            for ax in axes.flat:  # one legend holding every series of any panel
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    if label not in labels:
                        handles.append(handle)
                        labels.append(label)
            fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
            fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _plot_panel(ax, points: list[dict], key: str, log: bool) -> None:
    engine = [p for p in points if p["path"] == "engine"]
    for label in dict.fromkeys(_series_label(p) for p in engine):
        series = sorted((p["batch"], p[key]) for p in engine if _series_label(p) == label)
        ax.plot(*zip(*series), marker="o", linestyle="--" if label.endswith("(compiled)") else "-", label=label)
    reference = sorted((p["batch"], p[key]) for p in points if p["path"] == "hf")
    if reference:
        ax.plot(*zip(*reference), "k*", markersize=10, linestyle="none", label="teacher, transformers generate")
    ax.set_xscale("log", base=2)
    batches = sorted({p["batch"] for p in points})
    ax.set_xticks(batches, [str(b) for b in batches])  # 1, 16, 64 rather than powers of two
    ax.minorticks_off()
    if log:
        ax.set_yscale("log")
    else:  # the roofline itself at 1
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, max([1.1, *(1.05 * p[key] for p in points)]))
    ax.grid(True, which="both", alpha=0.3)


# ---------------------------------------------------------------------------------------------
# The run


def describe_run(options: BenchOptions, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "new_tokens": options.new_tokens, "repeats": options.repeats,
        "prefill_tokens": options.prefill_tokens, "ssd_backend": ops.select_backend(device),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()},
        "notes": [],
    }


def run_bench(options: BenchOptions) -> dict:
    """Measure every point of the grid; returns the document written to options.out/bench.json."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if "llama8b" in options.families and device.type != "cuda":  # before anything is written
        raise ValueError("the llama8b family needs a CUDA device (16 GB of bf16 weights)")
    clock = Clock(device)
    results = Results(Path(options.out), describe_run(options, device, dtype))
    bandwidth = measure_copy_bandwidth(device)
    results.doc["meta"]["copy_bandwidth"] = bandwidth
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written)", flush=True)
    else:
        print("no CUDA device: times from time.perf_counter; no peak memory, no roofline", flush=True)
    started = time.monotonic()

    def out_of_time() -> str | None:
        spent = time.monotonic() - started
        if options.time_budget_s is not None and spent > options.time_budget_s:
            return f"time budget of {options.time_budget_s:g} s spent"
        return None

    with torch.no_grad():
        for family in options.families:
            if "engine" in options.paths and options.attention:
                run_engine_grid(family, options, device, dtype, clock, bandwidth, results, out_of_time)
            if "hf" in options.paths and options.hf_batches:
                run_hf_reference(family, options, device, dtype, clock, bandwidth, results, out_of_time)
    results.render()
    print(f"wrote {results.out}/bench.json, bench.md, decode.png, roofline.png", flush=True)
    return results.doc


def run_engine_grid(family: str, options: BenchOptions, device: torch.device, dtype: torch.dtype, clock: Clock,
                    bandwidth: float | None, results: Results, out_of_time: Callable[[], str | None]) -> None:
    models = models_of(family, options, device, dtype)
    for fraction in options.attention:
        specs = [PointSpec(family, model_label(fraction), fraction, batch, context)
                 for context in options.contexts for batch in options.batches]
        late = out_of_time()
        if late:  # not even built: converting an 8B model would spend more of the time left
            for spec in specs:
                results.add(skip(new_engine_point(spec, None, options, device, dtype, None), late))
            continue
        _, model = next(models)
        warmed: set = set()  # the (rows, width) prefill shapes this model has run
        for spec in specs:  # contexts outer, batches inner: prefill shapes repeat and skip their warm-up
            late = out_of_time()
            if late:
                point = skip(new_engine_point(spec, model, options, device, dtype, bandwidth), late)
            else:
                point = bench_engine_point(model, spec, options, device, dtype, clock, bandwidth, warmed)
            if point.get("compile_error"):
                results.doc["meta"]["notes"].append(
                    f"{spec.family} {spec.label} b={spec.batch} ctx={spec.context}: {point['compile_error']}; "
                    "timed the engine's uncompiled step")
            results.add(point)
        del model
        results.render()  # tables and plots so far, in case the run is cut short
    models.close()
    free_memory()


def run_hf_reference(family: str, options: BenchOptions, device: torch.device, dtype: torch.dtype, clock: Clock,
                     bandwidth: float | None, results: Results, out_of_time: Callable[[], str | None]) -> None:
    # Shortest context first: transformers never shrinks a model's static cache back.
    contexts = sorted(options.hf_contexts or [min(options.contexts)])
    specs = [PointSpec(family, "teacher", 1.0, batch, context) for context in contexts for batch in options.hf_batches]
    teacher = None if out_of_time() else build_teacher(family, device, dtype, options.teacher, options.seed)
    for spec in specs:
        late = out_of_time()
        if late:
            slots = spec.context + options.new_tokens
            point = skip(new_point(spec, teacher, "hf", dtype, slots, bandwidth, compiled=device.type == "cuda"), late)
        else:
            point = bench_hf_point(teacher, spec, options, device, dtype, clock, bandwidth)
        if point.get("compile_error"):
            results.doc["meta"]["notes"].append(
                f"{spec.family} b={spec.batch} ctx={spec.context}: torch.compile failed ({point['compile_error']}); "
                "timed transformers' static cache without it")
        results.add(point)
    del teacher
    torch._dynamo.reset()  # drop the compiled graphs and their CUDA-graph memory pools
    free_memory()
    results.render()


def _untied_embedding_shape(family: str) -> tuple[int, int] | None:
    """(rows, width) of a family's input embedding table when it is not tied to the LM head; None
    for the default teacher, whose table is its head."""
    if family == "smollm2":
        return None
    config = llama8b_config() if family == "llama8b" else tiny_config()
    return config.vocab_size, config.hidden_size


def correct_legacy_point(point: dict) -> int:
    """A point recorded before decode steps counted only the embedding rows they gather (its
    roofline counted the whole table): recompute its step bytes, roofline and fraction in place.
    Returns the bytes taken off (0 for a current point, a tied table or a point never reached)."""
    if "weights_read_bytes_per_step" in point or point.get("bytes_per_step") is None:
        return 0
    shape = _untied_embedding_shape(point["family"])
    itemsize = getattr(torch, point["dtype"]).itemsize
    unread = 0 if shape is None else _unread_rows_bytes(*shape, itemsize, point["batch"])
    point["weights_read_bytes_per_step"] = point["weights_bytes"] - unread
    if unread:
        old = point["bytes_per_step"]
        point["bytes_per_step"] = old - unread
        if point.get("roofline_step_ms") is not None:
            point["roofline_step_ms"] *= point["bytes_per_step"] / old
            if point.get("decode_step_ms"):
                point["roofline_fraction"] = point["roofline_step_ms"] / point["decode_step_ms"]
    return unread


def render_from_json(paths: Sequence[str | Path], out: Path) -> dict:
    """Merge the points of earlier runs and write bench.json / bench.md / plots into ``out``.
    Points recorded before the roofline counted only the gathered embedding rows are corrected
    (:func:`correct_legacy_point`), with a note."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(docs[0]["meta"])
    meta["merged_from"] = [str(p) for p in paths]
    meta["notes"] = [note for doc in docs for note in doc["meta"].get("notes", [])]
    points = [p for doc in docs for p in doc["points"]]
    corrected = sum(correct_legacy_point(p) > 0 for p in points)
    note = ("roofline of points recorded before 2026-12-04 recomputed: their step bytes counted the whole "
            "untied input embedding table, of which a decode step reads only the rows it gathers")
    if corrected:
        meta["notes"] = [n for n in meta["notes"] if not n.startswith(note)] + [f"{note} ({corrected} points)"]
    results = Results(Path(out), meta, points)
    results.render()
    return results.doc


# ---------------------------------------------------------------------------------------------
# Command line (`mambaify bench` parses the arguments)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from the parsed arguments of ``mambaify bench``."""
    return BenchOptions(
        out=Path(args.out), families=parse_list(args.families, str), attention=parse_list(args.attention, float),
        batches=parse_list(args.batch), contexts=parse_list(args.context), new_tokens=args.new_tokens,
        repeats=args.repeats, prefill_tokens=args.prefill_tokens, prefill_budget_s=args.prefill_budget_s,
        paths=parse_list(args.paths, str), hf_batches=parse_list(args.hf_batch),
        hf_contexts=parse_list(args.hf_context) or None, memory_limit_gib=args.memory_limit_gib,
        time_budget_s=args.time_budget_s, device=args.device, dtype=args.dtype, teacher=args.teacher, seed=args.seed,
        compile=args.compile,
        compile_mode=args.compile_mode,
        small_batch_linear={"auto": "auto", "split-k": True, "modules": False}[
            "split-k" if args.small_batch_linear else args.linear],
        hf_prefill_chunk=args.hf_prefill_chunk,
    )


__all__ = [
    "BenchOptions",
    "Clock",
    "correct_legacy_point",
    "decode_step_bytes",
    "decode_weight_bytes",
    "engine_kv_slots_read",
    "estimate_memory",
    "kv_cache_bytes",
    "layer_shapes",
    "mamba_state_bytes",
    "options_from_args",
    "render_from_json",
    "run_bench",
    "unread_embedding_bytes",
    "weight_bytes",
]

