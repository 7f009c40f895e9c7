"""The generation engine against transformers' generate() and plain forward passes, on tiny models:
hybrids at 50% and 0% attention and the Llama teacher itself (100%)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mambaify import convert, ops
from mambaify.cli import main as cli_main
from mambaify.generate import engine as engine_module
from mambaify.generate.engine import Engine
from mambaify.generate.sampling import SamplingParams, keep_top_k, keep_top_p
from mambaify.models.modeling import GatedRMSNorm, Mamba2Mixer
from mambaify.ops.attention import decode_attention, decode_attention_op
from tests._tiny_data import tiny_llama, tiny_tokenizer
from tests.conftest import recording_backend, run_compiled_and_eager, tiny_teacher

PAD, EOS = 0, 2  # the tiny teacher's


def perturbed_hybrid(attention: float, **teacher_overrides):
    """A converted tiny Llama with its conv and skip moved off their init, so every path matters."""
    model = convert(tiny_teacher("llama", **teacher_overrides), attention=attention)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            if not layer.is_attention:
                layer.mamba.conv1d.weight.normal_(0, 0.3)
                layer.mamba.D.normal_(1, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=[0.5, 0.0, 1.0], ids=["hybrid-50", "hybrid-0", "llama"])
def model(request):
    return tiny_teacher("llama") if request.param == 1.0 else perturbed_hybrid(request.param)


@pytest.fixture(scope="module")
def hybrid():
    return perturbed_hybrid(0.5)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def random_prompts(*lengths: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


# --- greedy decoding equals transformers' generate ------------------------------------------


def test_greedy_batch1_equals_model_generate(model):
    ids = torch.tensor(random_prompts(9))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    engine = Engine(model, max_batch_size=1, max_length=32)
    assert torch.equal(engine.generate(ids, max_new_tokens=12), expected[:, ids.shape[1]:])


def test_left_padded_batch_equals_generate_and_each_prompt_alone(model):
    prompts = random_prompts(7, 2, 12)
    ids, mask = left_padded(prompts)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    engine = Engine(model, max_batch_size=4, max_length=32)
    batch = engine.generate(prompts, max_new_tokens=10)  # lists: the engine pads them itself
    assert torch.equal(batch, expected[:, ids.shape[1]:])
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], max_new_tokens=10)[0]
        assert batch[i, : len(alone)].tolist() == alone.tolist()


def test_prefill_logits_equal_forward(model):
    ids, mask = left_padded(random_prompts(5, 11, 1))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    logits = Engine(model, max_batch_size=3, max_length=16).prefill(ids, mask, logits_to_keep=0)
    real = mask.bool()
    assert torch.allclose(logits[real], expected[real], atol=1e-5)


def test_decode_steps_equal_recomputation(model):
    prompts = random_prompts(6, 3)
    ids, mask = left_padded(prompts)
    continuation = torch.tensor(random_prompts(8, 8, seed=4))  # fixed tokens, fed one step at a time
    engine = Engine(model, max_batch_size=2, max_length=16)
    engine.prefill(ids, mask)
    stepped = torch.stack([engine.decode(continuation[:, i]).clone() for i in range(8)], dim=1)
    full_ids = torch.cat([ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    with torch.no_grad():
        expected = model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    assert torch.allclose(stepped, expected[:, ids.shape[1]:], atol=1e-5)


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("mistral", {"sliding_window": 5})])
def test_other_families_and_sliding_windows(family, overrides):
    teacher = tiny_teacher(family)
    teacher.config.update(overrides)  # a window shorter than prompt + reply, so it matters
    for model in (teacher, convert(teacher, attention=0.5)):
        ids = torch.tensor(random_prompts(7))
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert torch.equal(Engine(model, max_batch_size=1, max_length=16).generate(ids, max_new_tokens=8),
                           expected[:, ids.shape[1]:])
        # The linear layers through ops.small_batch_linear (F.linear on the CPU): Qwen2's q/k/v biases too.
        fast = Engine(model, max_batch_size=1, max_length=16, small_batch_linear=True)
        assert torch.equal(fast.generate(ids, max_new_tokens=8), expected[:, ids.shape[1]:])


@pytest.fixture
def split_k(monkeypatch):
    """Decode attention through ops.decode_attention (the CUDA branch), on its PyTorch path."""
    calls = []

    def counted(*args):
        calls.append(args[4].shape)
        return decode_attention(*args)

    monkeypatch.setattr(engine_module, "use_split_k_attention", lambda device: True)
    monkeypatch.setattr(engine_module, "decode_attention_op", counted)
    return calls


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_split_k_decode_attention_branch_equals_generate(split_k, family, overrides):
    teacher = tiny_teacher(family)
    teacher.config.update(overrides)
    for model in (teacher, convert(teacher, attention=0.5)):
        prompts = random_prompts(7, 2, 12)
        ids, mask = left_padded(prompts)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(Engine(model, max_batch_size=3, max_length=32).generate(prompts, max_new_tokens=10),
                           expected[:, ids.shape[1]:])
    assert split_k and all(shape == (1,) for shape in split_k)  # one slot per decode step, every row


def test_split_k_branch_under_compile(split_k, monkeypatch):
    monkeypatch.setattr(engine_module, "decode_attention_op", decode_attention_op)  # the custom op itself
    model = perturbed_hybrid(0.5, num_hidden_layers=2)
    prompts = random_prompts(7, 3)
    compiled = Engine(model, max_batch_size=2, max_length=32, compile=True)
    eager = Engine(model, max_batch_size=2, max_length=32)
    greedy = dict(max_new_tokens=12, stop_token_ids=[])
    assert torch.equal(compiled.generate(prompts, **greedy), eager.generate(prompts, **greedy))
    assert compiled.is_compiled(2) and compiled.compile_error is None


def test_step_constants_follow_the_model():
    """What the decode step keeps computed: the RoPE table equals the model's rotary embedding at
    every position, and A = -exp(A_log) follows the parameters from one request to the next."""
    model = perturbed_hybrid(0.5)
    engine = Engine(model, max_batch_size=2, max_length=32)
    at = torch.tensor([[0, 5, 31], [7, 1, 30]])
    cos, sin = model.model.rotary_emb(torch.empty(0), at)
    table = engine.stack.rope_table[at]
    assert torch.equal(table[:, :, 0], cos) and torch.equal(table[:, :, 1], sin)
    ids, mask = left_padded(random_prompts(6, 3))
    continuation = torch.tensor(random_prompts(4, 4, seed=5))
    full_ids = torch.cat([ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    for shift in (0.0, 1.5):  # a second request after the decay rates changed
        with torch.no_grad():
            for layer in model.model.layers:
                if not layer.is_attention:
                    layer.mamba.A_log.add_(shift)
            expected = model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits
        engine.prefill(ids, mask)
        stepped = torch.stack([engine.decode(continuation[:, i]).clone() for i in range(4)], dim=1)
        assert torch.allclose(stepped, expected[:, ids.shape[1]:], atol=1e-5)


# --- sampling, stopping, streaming ------------------------------------------------------------


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(keep_top_k(logits, 2)).tolist() == [[True, False, True, False]]
    probs = logits.softmax(-1)[0]  # 0.03, 0.64, 0.09, 0.24
    nucleus = keep_top_p(logits, float(probs[1] + 0.01))  # 0.64 is not enough: the 0.24 joins
    assert torch.isinf(nucleus).tolist() == [[True, False, True, False]]
    assert torch.isinf(keep_top_p(logits, 0.5)).tolist() == [[True, False, True, True]]  # the top token always stays
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_programmatic_dependent_launch_is_asked_for_by_the_environment(monkeypatch):
    """MAMBAIFY_PDL=1 asks for PDL; only on a Hopper-or-later GPU does it reach inductor's options
    and the GEMV's launches (elsewhere the compiled step is what it was)."""
    from torch._inductor import config as inductor_config

    from mambaify import ops
    from mambaify.generate.engine import _pdl_options

    monkeypatch.delenv("MAMBAIFY_PDL", raising=False)
    assert not ops.pdl_requested() and _pdl_options(inductor_config) == {}
    monkeypatch.setenv("MAMBAIFY_PDL", "0")
    assert not ops.pdl_requested()
    monkeypatch.setenv("MAMBAIFY_PDL", "1")
    assert ops.pdl_requested()
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    assert _pdl_options(inductor_config) == ({"triton.enable_pdl": True} if hopper else {})
    pdl = pytest.importorskip("mambaify.ops.triton.pdl")
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}  # the interpreter's kernels run as they were
    if hopper:
        assert pdl.launch_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


def test_greedy_tokens_equal_argmax_compiled_in_two_stages():
    """greedy_tokens is argmax(-1) (the first maximum) eagerly and compiled, where it runs in two
    stages: ties across and inside chunks, a maximum in the padded last chunk, -inf rows, NaN."""
    from mambaify.generate.sampling import ARGMAX_CHUNK, greedy_tokens

    vocab = 5 * ARGMAX_CHUNK + 17  # the last chunk is padded
    torch.manual_seed(0)
    logits = torch.randn(3, 4, vocab)
    logits[0, 0, [7, 3 * ARGMAX_CHUNK + 5]] = 9.0  # a tie across chunks: the first wins
    logits[0, 1, [ARGMAX_CHUNK + 2, ARGMAX_CHUNK + 9]] = 9.0  # a tie inside a chunk
    logits[0, 2, vocab - 1] = 9.0  # in the padded chunk
    logits[1, 0] = float("-inf")
    logits[1, 1, 2 * ARGMAX_CHUNK + 4] = float("nan")
    compiled = torch.compile(greedy_tokens, backend="inductor", fullgraph=True)
    expected = logits.argmax(-1)
    assert torch.equal(greedy_tokens(logits), expected)
    assert torch.equal(compiled(logits), expected)
    assert torch.equal(compiled(logits[:, 0]), expected[:, 0])  # (b, V), as a draft step calls it
    small = torch.randn(2, 100)  # below four chunks: a plain argmax
    assert torch.equal(compiled(small), small.argmax(-1))


def test_sampling_is_seeded_and_top_k_1_is_greedy(hybrid):
    prompts = random_prompts(5, 8)
    engine = Engine(hybrid, max_batch_size=2, max_length=32)
    options = dict(max_new_tokens=12, temperature=1.5, stop_token_ids=[])
    first = engine.generate(prompts, seed=7, **options)
    assert torch.equal(engine.generate(prompts, seed=7, **options), first)
    assert not torch.equal(engine.generate(prompts, seed=8, **options), first)
    greedy = engine.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    assert torch.equal(engine.generate(prompts, seed=7, top_k=1, **options), greedy)
    assert torch.equal(engine.generate(prompts, seed=7, top_p=1e-6, **options), greedy)


def test_stop_tokens_stop_rows_independently(hybrid):
    prompts = random_prompts(5, 8, 3)
    engine = Engine(hybrid, max_batch_size=3, max_length=32)
    free = engine.generate(prompts, max_new_tokens=10, stop_token_ids=[]).tolist()
    stop = next(token for token in free[0] if token not in free[-1])  # stops row 0, never the last row
    stops_at = [row.index(stop) if stop in row else None for row in free]
    assert stops_at[0] < 9 and stops_at[-1] is None
    out = engine.generate(prompts, max_new_tokens=10, stop_token_ids=[stop]).tolist()
    for row, free_row, at in zip(out, free, stops_at):
        if at is None:
            assert row == free_row
        else:  # the stop token is emitted, then padding
            assert row[: at + 1] == free_row[: at + 1] and set(row[at + 1:]) <= {PAD}


def test_stream_yields_what_generate_returns(hybrid):
    prompts = random_prompts(4, 9)
    engine = Engine(hybrid, max_batch_size=2, max_length=32)
    free = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[])
    stop = [free[1, 3].item()]  # row 1 stops early, row 0 keeps going
    generated = engine.generate(prompts, max_new_tokens=8, stop_token_ids=stop)
    steps = list(engine.stream(prompts, max_new_tokens=8, stop_token_ids=stop))
    assert len(steps) == generated.shape[1]
    streamed = torch.tensor([[PAD if token is None else token for token in step] for step in steps]).T
    assert torch.equal(streamed, generated)
    assert steps[-1][1] is None  # a stopped row yields None, not a token


def test_stop_watch_reads_each_flag_lag_steps_late_on_the_cpu():
    running, stopped = torch.tensor([True, False]), torch.tensor([False, False])
    assert engine_module.StopWatch(torch.device("cpu"), 0).all_stopped(stopped)
    watch = engine_module.StopWatch(torch.device("cpu"), 2)
    seen = [watch.all_stopped(flags) for flags in (running, stopped, running, running)]
    assert seen == [False, False, False, True]  # step 1's "all stopped" is read at step 3
    with pytest.raises(ValueError, match="lag"):
        engine_module.StopWatch(torch.device("cpu"), -1)


@pytest.mark.parametrize("lag", [1, 3, 20])
def test_generate_with_a_late_stop_check_returns_the_same_tokens(hybrid, lag):
    """Every row stops early; the loop that learns it `lag` steps late decodes more steps but
    returns exactly what the loop that checks every step returns."""
    prompts = random_prompts(5, 8, 3)
    engine = Engine(hybrid, max_batch_size=3, max_length=40)
    free = engine.generate(prompts, max_new_tokens=24, stop_token_ids=[]).tolist()
    stop = sorted({row[2] for row in free})  # each row stops by its third token
    expected = engine.generate(prompts, max_new_tokens=24, stop_token_ids=stop)
    assert expected.shape[1] <= 3
    calls = []
    decode = engine._decode
    engine._decode = lambda *args: calls.append(1) or decode(*args)
    engine.stop_check_lag = lag
    late = engine.generate(prompts, max_new_tokens=24, stop_token_ids=stop)
    assert torch.equal(late, expected)
    assert len(calls) == min(expected.shape[1] - 1 + lag, 23)  # the extra steps were run, then dropped


def test_fast_paths_can_be_switched_off_from_the_environment(monkeypatch):
    monkeypatch.delenv("MAMBAIFY_PREFILL_GRAPHS", raising=False)
    assert engine_module.fast_path_enabled("MAMBAIFY_PREFILL_GRAPHS")
    monkeypatch.setenv("MAMBAIFY_PREFILL_GRAPHS", "0")
    assert not engine_module.fast_path_enabled("MAMBAIFY_PREFILL_GRAPHS")


def test_prefill_width_buckets():
    widths = (16, 32, 64)
    assert engine_module.prefill_width(widths, 1, 9, room=100) == 16
    assert engine_module.prefill_width(widths, 1, 16, room=100) == 16
    assert engine_module.prefill_width(widths, 1, 17, room=100) == 32
    assert engine_module.prefill_width(widths, 1, 65, room=1000) is None  # longer than every width
    assert engine_module.prefill_width(widths, 1, 20, room=31) is None  # no room for the padding
    too_many = engine_module.PREFILL_GRAPH_TOKENS // 32 + 1
    assert engine_module.prefill_width(widths, too_many, 20, room=100) is None
    assert engine_module.prefill_width(None, 1, 9, room=100) is None


def test_prompts_padded_to_a_prefill_width_give_the_same_tokens(model):
    """What the CUDA-graphed prefill does to a short prompt (more left padding, up to a width a
    graph was captured for), run eagerly here: the same tokens, greedy and sampled, batch 1 and a
    ragged batch, with stop tokens; a request without room for the padding is left as it is."""
    prompts = random_prompts(5, 9, 3)
    plain = Engine(model, max_batch_size=3, max_length=40)
    padded = Engine(model, max_batch_size=3, max_length=40)
    assert plain.prefill_widths is None  # the CPU default
    padded.prefill_widths = (16, 24)
    for batch in (prompts[:1], prompts):
        for options in (dict(stop_token_ids=[]), dict(temperature=1.0, top_k=20, seed=4, stop_token_ids=[])):
            expected = plain.generate(batch, max_new_tokens=12, **options)
            assert torch.equal(padded.generate(batch, max_new_tokens=12, **options), expected)
            assert padded._request.next_slot == 16 + 11  # the prompt filled slots 0..15
        free = plain.generate(batch, max_new_tokens=12, stop_token_ids=[]).tolist()
        stop = [free[0][4]]
        assert torch.equal(padded.generate(batch, max_new_tokens=12, stop_token_ids=stop),
                           plain.generate(batch, max_new_tokens=12, stop_token_ids=stop))
    padded.generate(prompts, max_new_tokens=30, stop_token_ids=[])  # 9 + 30 fits 40; 16 + 30 does not
    assert padded._request.next_slot == 9 + 29
    assert padded.prefill_counts["eager"] >= 1 and plain.pad_slots == 0  # the CPU allocates no pad slots


def test_pad_slots_let_an_exactly_sized_engine_pad_its_prompts(model):
    """An engine sized exactly to its requests (prompt + max_new_tokens = max_length) still pads a
    short prompt to a graphed width, into its pad slots past max_length: the same tokens as
    without padding, and the slots the padding took. Session 8 found every timed request of
    bench_speculative prefilling eagerly for want of them."""
    prompts = random_prompts(5, 9, 3)
    plain = Engine(model, max_batch_size=3, max_length=9 + 30)
    padded = Engine(model, max_batch_size=3, max_length=9 + 30, prefill_pad_slots=8)
    assert padded.pad_slots == 8 and padded.stack.num_slots == 39 + 8
    kv = [layer for layer in padded.cache.layers if isinstance(layer, engine_module.KVBuffers)]
    assert all(layer.keys.shape[2] == 47 for layer in kv)  # (none in a pure-Mamba2 model)
    padded.prefill_widths = (16, 24)
    for batch in (prompts[:1], prompts):
        expected = plain.generate(batch, max_new_tokens=30, stop_token_ids=[])
        assert torch.equal(padded.generate(batch, max_new_tokens=30, stop_token_ids=[]), expected)
        assert padded._request.next_slot == 16 + 29  # padded to 16: 7 of the pad slots
    with pytest.raises(ValueError, match="max_length=39"):  # the contract is still max_length
        padded.generate(prompts, max_new_tokens=31, stop_token_ids=[])
    with pytest.raises(ValueError, match="prefill_pad_slots must be >= 0"):
        Engine(model, max_length=40, prefill_pad_slots=-1)
    on_cuda = engine_module.pad_slots_for(torch.device("cuda"), "auto")
    assert on_cuda == engine_module.PREFILL_PAD_SLOTS == 128
    assert engine_module.pad_slots_for(torch.device("cuda"), False) == 0
    assert engine_module.pad_slots_for(torch.device("cpu"), "auto") == 0
    # With 128 pad slots, any prompt of up to 256 tokens fits its graphed width at no room at all.
    widths = engine_module.PREFILL_GRAPH_WIDTHS
    assert all(engine_module.prefill_width(widths, 1, w, room=w + on_cuda) is not None for w in range(1, 257))


def test_report_generations_through_the_engine_equal_transformers_generate(monkeypatch):
    """The distillation report's side-by-side answers: all prompts in one Engine request give
    what transformers' generate gives each prompt alone (the fallback for models the Engine
    cannot serve)."""
    from mambaify.eval import metrics

    tok = tiny_tokenizer()
    teacher = tiny_llama(tok)
    models = {"teacher": teacher, "student": convert(teacher, attention=0.5).eval()}
    prompts = ["Tell me about the Moon.", "Hi", "What is a state space model? Explain it simply."]
    ours = metrics.greedy_generations(models, tok, prompts, max_new_tokens=10)
    assert [row["prompt"] for row in ours] == prompts
    assert all(row["teacher"] and row["student"] for row in ours)

    def cannot_serve(self, *args, **kwargs):
        raise TypeError("not a model the Engine serves")

    monkeypatch.setattr(engine_module.Engine, "__init__", cannot_serve)
    assert metrics.greedy_generations(models, tok, prompts, max_new_tokens=10) == ours


def test_report_metrics_do_not_depend_on_the_batch_size():
    """compare_on_documents pads each batch on the right: the scored tokens see the same context
    whatever the batch, so perplexities, KL and agreement agree across batch sizes."""
    from mambaify.distill.data import tokenize_text
    from mambaify.eval import metrics

    tok = tiny_tokenizer()
    teacher = tiny_llama(tok)
    student = convert(teacher, attention=0.5).eval()
    texts = ["Rivers carry water down to the sea.", "A library lends books.", "The violin has four strings and a bow.",
             "Hi", "Mountains are tall and old, older than the rivers that cut them."]
    docs = [tokenize_text(tok, t) for t in texts]
    one = metrics.compare_on_documents(student, teacher, docs, batch_size=1, progress=False)
    for size in (2, None):
        other = metrics.compare_on_documents(student, teacher, docs, batch_size=size, progress=False)
        assert other["tokens"] == one["tokens"]
        for key in ("student_ppl", "teacher_ppl", "kl", "top1_agreement"):
            assert other[key] == pytest.approx(one[key], rel=1e-4), key


def test_opt_in_from_the_model_returns_what_model_generate_returns(hybrid):
    ids, mask = left_padded(random_prompts(4, 7))
    expected = hybrid.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(engine_module.generate(hybrid, ids, mask, max_new_tokens=6), expected)
    cached = hybrid._mambaify_engine
    engine_module.generate(hybrid, ids[:1], mask[:1], max_new_tokens=6)
    assert hybrid._mambaify_engine is cached  # a smaller request reuses the engine


def test_bad_requests_are_refused(hybrid):
    engine = Engine(hybrid, max_batch_size=2, max_length=16)
    ids = torch.tensor([[5, 6, 7, 0]])
    with pytest.raises(ValueError, match="left padding"):
        engine.generate(ids, torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="max_length"):
        engine.generate(ids, max_new_tokens=13)
    with pytest.raises(ValueError, match="max_batch_size"):
        engine.generate([[5], [6], [7]])
    stream = engine.stream([[5, 6]], max_new_tokens=4, stop_token_ids=[])
    next(stream)
    engine.prefill([[8, 9]])  # a new request takes over the cache
    with pytest.raises(RuntimeError, match="another request"):
        next(stream)


# --- text in, text out, and the command line --------------------------------------------------


@pytest.fixture(scope="module")
def saved_hybrid(tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrid")
    tokenizer = tiny_tokenizer()
    convert(tiny_llama(tokenizer), attention=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_text_helpers(saved_hybrid):
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(saved_hybrid).eval()
    engine = Engine(model, tokenizer, max_batch_size=2, max_length=64)
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    new = new[: (new == tokenizer.eos_token_id).nonzero()[0, 0]] if tokenizer.eos_token_id in new else new
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert engine.generate_text("The quick brown fox", max_new_tokens=10) == expected
    assert "".join(engine.stream_text("The quick brown fox", max_new_tokens=10)) == expected
    replies = engine.generate_text(["The quick brown fox", "Hello!"], max_new_tokens=10)
    assert replies[0] == expected and replies[1] == engine.generate_text("Hello!", max_new_tokens=10)
    messages = [{"role": "user", "content": "Tell me about the Moon."}]
    assert engine.chat(messages, max_new_tokens=10) == "".join(engine.stream_chat(messages, max_new_tokens=10))


def test_cli_generate_prints_the_completion(saved_hybrid, capsys):
    model = AutoModelForCausalLM.from_pretrained(saved_hybrid).eval()
    expected = Engine(model, tiny_tokenizer(), max_length=64).generate_text("Hello! How", max_new_tokens=8)
    for extra in ([], ["--stream"]):
        args = ["generate", str(saved_hybrid), "Hello! How", "--max-new-tokens", "8", "--device", "cpu", *extra]
        assert cli_main(args) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_keeps_the_history(saved_hybrid, capsys, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(saved_hybrid).eval()
    engine = Engine(model, tiny_tokenizer(), max_length=256)
    history = [{"role": "user", "content": "Hello!"}]
    first = engine.chat(history, max_new_tokens=6)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is the Moon?"}]
    second = engine.chat(history, max_new_tokens=6)

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n\nWhat is the Moon?\n/exit\nnot read\n"))
    assert cli_main(["chat", str(saved_hybrid), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n"


@pytest.mark.parametrize(
    "args, message", [(["{missing}", "hi"], "Cannot find"), (["{model}", "hi", "--top-p", "0"], "top_p")]
)
def test_cli_bad_input_is_one_error_line(saved_hybrid, tmp_path, capsys, args, message):
    names = dict(missing=tmp_path / "nowhere", model=saved_hybrid)
    assert cli_main(["generate", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mambaify generate: error:") and message in err[0]


def test_cli_refuses_a_checkpoint_with_missing_weights(saved_hybrid, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(saved_hybrid, broken)
    weights = load_file(broken / "model.safetensors")
    lost = next(k for k in weights if ".mamba." in k)
    del weights[lost]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["generate", str(broken), "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mambaify generate: error:") and lost in err[-1] and "not a complete checkpoint" in err[-1]


# --- CUDA graphs ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 0.0, 1.0])
def test_cuda_graph_decode_equals_eager(attention):
    model = (tiny_teacher("llama") if attention == 1.0 else perturbed_hybrid(attention)).cuda()
    prompts = random_prompts(7, 2, 12)
    graphed = Engine(model, max_batch_size=4, max_length=48, use_cuda_graph=True)
    eager = Engine(model, max_batch_size=4, max_length=48, use_cuda_graph=False)
    for batch in (prompts, prompts[:1]):  # two batch sizes: two captured graphs
        options = dict(max_new_tokens=24, stop_token_ids=[])
        assert torch.equal(graphed.generate(batch, **options), eager.generate(batch, **options))
        sampled = dict(options, temperature=1.0, top_p=0.9, seed=3)
        assert torch.equal(graphed.generate(batch, **sampled), eager.generate(batch, **sampled))
    # The prompts (12 wide at most) were padded to 16 and prefilled from a graph per batch size.
    assert graphed.prefill_error is None and set(graphed._prefill_graphs) == {(3, 16), (1, 16)}
    # Stop tokens that end every row early: the graphed engine's late stop check (StopWatch on
    # CUDA: pinned flags and events) must return what checking every step returns.
    free = eager.generate(prompts, max_new_tokens=24, stop_token_ids=[]).tolist()
    stop = dict(max_new_tokens=24, stop_token_ids=sorted({row[3] for row in free}))
    assert graphed.stop_check_lag > 0
    eager.stop_check_lag = 0
    expected = eager.generate(prompts, **stop)
    assert expected.shape[1] <= 4 and torch.equal(graphed.generate(prompts, **stop), expected)
    ids, mask = left_padded(prompts)
    graphed.prefill(ids, mask)
    eager.prefill(ids, mask)
    token = torch.tensor([5, 6, 7], device="cuda")
    assert torch.allclose(graphed.decode(token), eager.decode(token), atol=1e-4)


# --- torch.compile: the decode step, and the custom ops it sees -------------------------------
# Inductor on the CPU, one compile per test, of two-layer models (an attention and a Mamba layer
# in the hybrid): compile time grows with the layers, and the first compile in a fresh
# environment also builds inductor's own C++ prelude.


@pytest.mark.parametrize("attention", [0.5, 1.0], ids=["hybrid-50", "llama"])
def test_compiled_decode_equals_eager(attention):
    two_layers = dict(num_hidden_layers=2)
    model = tiny_teacher("llama", **two_layers) if attention == 1.0 else perturbed_hybrid(attention, **two_layers)
    prompts = random_prompts(7, 3)  # batch 2, left-padded by the engine
    # Three rows of cache, two in use: the compiled step writes into views of the buffers.
    compiled = Engine(model, max_batch_size=3, max_length=32, compile=True)
    eager = Engine(model, max_batch_size=3, max_length=32)
    greedy = dict(max_new_tokens=12, stop_token_ids=[])
    sampled = dict(greedy, temperature=1.0, top_p=0.9, seed=3)
    for options in (greedy, sampled):
        assert torch.equal(compiled.generate(prompts, **options), eager.generate(prompts, **options))
    assert compiled.is_compiled(2) and not eager.is_compiled(2) and compiled.compile_error is None
    seconds = compiled.compile_seconds
    assert seconds > 0
    ids, mask = left_padded(prompts)
    compiled.prefill(ids, mask)
    eager.prefill(ids, mask)
    for token in ([5, 6], [7, 8], [9, 10]):
        token = torch.tensor(token)
        assert torch.allclose(compiled.decode(token), eager.decode(token), atol=1e-5)
    # Every request ran the step compiled once: no recompile (the compiled step would raise on one).
    assert compiled.compile_seconds == seconds


def test_compile_settings(hybrid, monkeypatch, caplog):
    assert Engine(hybrid, max_length=16, compile="auto").compile is False  # off on the CPU
    with pytest.raises(ValueError, match="compile"):
        Engine(hybrid, max_length=16, compile="yes")
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        Engine(hybrid, max_length=16, compile=True, compile_mode="reduce-overhead")

    def broken(step, mode):
        raise RuntimeError("inductor is unhappy\nsecond line")

    monkeypatch.setattr(engine_module, "compile_step", broken)
    prompts = random_prompts(4, 6)
    expected = Engine(hybrid, max_batch_size=2, max_length=16).generate(prompts, max_new_tokens=4)
    insisting = Engine(hybrid, max_batch_size=2, max_length=16, compile=True)
    with pytest.raises(engine_module.CompileError, match="inductor is unhappy"):
        insisting.generate(prompts, max_new_tokens=4)
    # "auto" (on CUDA) falls back to the eager step and says why.
    falling_back = Engine(hybrid, max_batch_size=2, max_length=16, compile=True)
    falling_back.compile_setting = "auto"
    with caplog.at_level("WARNING", logger=engine_module.__name__):
        assert torch.equal(falling_back.generate(prompts, max_new_tokens=4), expected)
    assert falling_back.compile is False and not falling_back.is_compiled(2)
    assert falling_back.compile_error == "RuntimeError: inductor is unhappy"
    assert "decoding without torch.compile" in caplog.text


def mamba_step_inputs(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    b, h, n, p, d, K = 2, 3, 4, 5, 7, 4
    return dict(
        state=randn(b, h, n, p), x=randn(b, h, p), dt=torch.nn.functional.softplus(randn(b, h)),
        A=-torch.rand(h, generator=g, dtype=torch.float64) - 0.1, B=randn(b, h, n), C=randn(b, h, n), D=randn(h),
        conv_state=randn(b, d, K - 1), u=randn(b, d), weight=randn(d, K), bias=randn(d),
        y=randn(b, 3, h * p), z=randn(b, 3, h * p), norm_weight=randn(h * p),
    )


def mamba_ops_step(i: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three ops a compiled decode step calls, each writing its state in place."""
    conv = ops.conv_step_inplace(i["conv_state"], i["u"], i["weight"], i["bias"])
    y = ops.ssd_step_inplace(i["state"], i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"])
    return conv, y, ops.gated_rmsnorm(i["y"], i["z"], i["norm_weight"], 1e-5)


def test_custom_ops_equal_the_reference_and_stay_opaque_under_compile():
    i = mamba_step_inputs()
    # The registered ops themselves, against the reference.
    y_ref, state_ref = ops.ssd_step(i["state"], i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"])
    state, out = i["state"].clone(), torch.empty_like(i["x"])
    torch.ops.mambaify.ssd_step_inplace(state, i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], out)
    assert torch.equal(out, y_ref) and torch.equal(state, state_ref)
    conv_ref, conv_state_ref = ops.causal_conv1d(i["u"][:, None], i["weight"], i["bias"], i["conv_state"])
    conv_state, conv_out = i["conv_state"].clone(), torch.empty_like(i["u"])
    torch.ops.mambaify.conv_step_inplace(conv_state, i["u"], i["weight"], i["bias"], True, conv_out)
    assert torch.equal(conv_out, torch.nn.functional.silu(conv_ref[:, 0])) and torch.equal(conv_state, conv_state_ref)
    norm = GatedRMSNorm(i["y"].shape[-1], eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(i["norm_weight"])
        normed = torch.ops.mambaify.gated_rmsnorm(i["y"], i["z"], i["norm_weight"], 1e-5)
        assert torch.equal(normed, norm(i["y"], i["z"]))
    # Declared mutations, fake (meta) functions and schemas agree with what the ops do.
    torch.library.opcheck(torch.ops.mambaify.ssd_step_inplace.default,
                          (i["state"].clone(), i["x"], i["dt"], i["A"], i["B"], i["C"], None, torch.empty_like(i["x"])))
    torch.library.opcheck(torch.ops.mambaify.conv_step_inplace.default,
                          (i["conv_state"].clone(), i["u"], i["weight"], None, False, torch.empty_like(i["u"])))
    torch.library.opcheck(torch.ops.mambaify.gated_rmsnorm.default, (i["y"], i["z"], i["norm_weight"], 1e-5))

    # Under torch.compile: one graph (fullgraph), holding each op as one opaque call.
    got, expected, compiled_inputs, eager_inputs, mambaify_ops = run_compiled_and_eager(mamba_ops_step, i)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for name in ("state", "conv_state"):  # written in place, as eagerly
        assert torch.equal(compiled_inputs[name], eager_inputs[name])
        assert not torch.equal(compiled_inputs[name], i[name])
    assert mambaify_ops == ["mambaify.conv_step_inplace", "mambaify.gated_rmsnorm", "mambaify.ssd_step_inplace"]

    # Where a gradient is wanted (training), gated_rmsnorm stays the differentiable function.
    seen: list[str] = []
    weight = i["norm_weight"].clone().requires_grad_()
    differentiable = torch.compile(ops.gated_rmsnorm, backend=recording_backend(seen), fullgraph=True)
    differentiable(i["y"], i["z"], weight, 1e-5).sum().backward()
    assert not any(target.startswith("mambaify.") for target in seen) and weight.grad is not None


def test_bench_compile_flag_records_what_ran(tmp_path, monkeypatch):
    """`mambaify bench --compile`: each point records whether its step ran compiled, a
    step that fails to compile is timed uncompiled with a note, and merged runs keep the two
    apart. compile_step is replaced here (the bench's bookkeeping is under test, not inductor)."""
    from mambaify import bench

    modes = []

    def recorded(step, mode):
        modes.append(mode)
        return step

    monkeypatch.setattr(engine_module, "compile_step", recorded)
    argv = ["--families", "tiny", "--attention", "1", "--batch", "1", "--context", "16", "--new-tokens", "2",
            "--repeats", "1", "--hf-batch", "none", "--device", "cpu", "--out"]
    docs = {}
    for name, flags in (("on", ["--compile"]), ("off", []),
                        ("tuned", ["--compile", "--compile-mode", "max-autotune-no-cudagraphs"])):
        assert cli_main(["bench", *flags, *argv, str(tmp_path / name)]) == 0
        docs[name] = json.loads((tmp_path / name / "bench.json").read_text())
    assert modes == ["default", "max-autotune-no-cudagraphs"]
    on, off, tuned = (docs[name]["points"][0] for name in ("on", "off", "tuned"))
    assert on["compiled"] is True and off["compiled"] is False and on["compile_error"] is None
    assert (on["compile_mode"], off["compile_mode"], tuned["compile_mode"]) == (
        "default", None, "max-autotune-no-cudagraphs")
    assert "| teacher | engine (compiled, max-autotune-no-cudagraphs) | 1 | 16 |" in (
        tmp_path / "tuned" / "bench.md").read_text()
    with pytest.raises(SystemExit):  # argparse names the modes there are
        cli_main(["bench", "--compile", "--compile-mode", "reduce-overhead", *argv, str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--compile-mode must be one of"):
        bench.BenchOptions(out=tmp_path, compile=True, compile_mode="reduce-overhead")
    assert docs["on"]["meta"]["options"]["compile"] is True and on["compile_s"] <= on["capture_s"]

    def broken(step, mode):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(engine_module, "compile_step", broken)
    assert cli_main(["bench", "--compile", *argv, str(tmp_path / "broken")]) == 0
    doc = json.loads((tmp_path / "broken" / "bench.json").read_text())
    point = doc["points"][0]
    assert point["status"] == "ok" and point["compiled"] is False and "no compiler here" in point["compile_error"]
    assert any("no compiler here" in note for note in doc["meta"]["notes"])

    merged = bench.render_from_json([tmp_path / name / "bench.json" for name in ("on", "off", "tuned")],
                                    tmp_path / "all")
    table = (tmp_path / "all" / "bench.md").read_text()
    assert "| teacher | engine (compiled) | 1 | 16 |" in table and "| teacher | engine | 1 | 16 |" in table
    # Each teacher point is its own reference (compiled with compiled in the same mode, uncompiled
    # with uncompiled).
    assert [p["decode_vs_teacher"] for p in merged["points"]] == [1.0, 1.0, 1.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 1.0], ids=["hybrid-50", "llama"])
def test_cuda_compiled_graph_decode_equals_eager_in_bf16(attention):
    """The compiled step captured in a CUDA graph, against the uncompiled step run eagerly, in
    bf16: the Triton kernels as custom ops inside inductor's graph, and inductor's fused kernels
    rounding where eager rounds."""
    model = (tiny_teacher("llama") if attention == 1.0 else perturbed_hybrid(attention)).to("cuda", torch.bfloat16)
    prompts = random_prompts(7, 2, 12)
    compiled = Engine(model, max_batch_size=4, max_length=48, use_cuda_graph=True, compile=True)
    eager = Engine(model, max_batch_size=4, max_length=48, use_cuda_graph=False)
    for batch in (prompts, prompts[:1]):  # two batch sizes: two compiled steps, two graphs
        options = dict(max_new_tokens=24, stop_token_ids=[])
        assert torch.equal(compiled.generate(batch, **options), eager.generate(batch, **options))
        sampled = dict(options, temperature=1.0, top_p=0.9, seed=3)
        assert torch.equal(compiled.generate(batch, **sampled), eager.generate(batch, **sampled))
    assert compiled.is_compiled(3) and compiled.is_compiled(1)
    ids, mask = left_padded(prompts)
    compiled.prefill(ids, mask)
    eager.prefill(ids, mask)
    token = torch.tensor([5, 6, 7], device="cuda")
    assert torch.allclose(compiled.decode(token).float(), eager.decode(token).float(), atol=2e-2, rtol=2e-2)


# --- small_batch_linear: the linear layers through ops.small_batch_linear ---------------------


def test_small_batch_linear_runs_every_linear_through_the_op_and_changes_nothing_on_the_cpu(model, monkeypatch):
    # On the CPU the op is F.linear, so the tokens and logits must be the same bits; the counter
    # shows that every linear of a step (and the MLP rebuilt from its projections) went through it.
    prompts = random_prompts(6, 3, 9)
    options = dict(max_new_tokens=10, stop_token_ids=[])
    plain = Engine(model, max_batch_size=3, max_length=32)
    expected = plain.generate(prompts, **options)
    calls, gated, qkv = [], [], []
    real, real_gated, real_qkv = ops.small_batch_linear, ops.small_batch_gated_up, ops.small_batch_qkv
    monkeypatch.setattr(ops, "small_batch_linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
    monkeypatch.setattr(ops, "small_batch_gated_up",
                        lambda x, g, u: gated.append(tuple(g.shape)) or real_gated(x, g, u))
    monkeypatch.setattr(ops, "small_batch_qkv",
                        lambda x, *wb, **norm: qkv.append(tuple(wb[0].shape)) or real_qkv(x, *wb, **norm))
    fast = Engine(model, max_batch_size=3, max_length=32, small_batch_linear=True, fold_norms=False)
    assert torch.equal(fast.generate(prompts, **options), expected)
    ids, mask = left_padded(prompts)
    plain.prefill(ids, mask)
    fast.prefill(ids, mask)
    calls.clear()
    gated.clear()
    qkv.clear()
    token = torch.tensor([5, 6, 7])
    assert torch.equal(fast.decode(token), plain.decode(token))
    layers = model.model.layers
    attention = [layer for layer in layers if not hasattr(layer, "mamba") or layer.is_attention]
    # attention layer: o + down; Mamba layer: in_proj, out_proj + down; the head. An attention
    # layer's q, k and v: one grouped call; the SiLU MLP's gate and up: one fused call per layer.
    assert len(calls) == 2 * len(attention) + 3 * (len(layers) - len(attention)) + 1
    assert tuple(model.lm_head.weight.shape) in calls
    assert gated == [tuple(layer.mlp.gate_proj.weight.shape) for layer in layers]
    assert qkv == [tuple(layer.self_attn.q_proj.weight.shape) for layer in attention]


@contextlib.contextmanager
def spy_on_gemv_norms():
    """The row counts of the small-batch linear calls given a norm to fold, while in the block."""
    seen: set[int] = set()
    originals = {name: getattr(ops, name) for name in ("small_batch_linear", "small_batch_qkv", "small_batch_gated_up")}

    def spy(original):
        def call(x, *args, **kwargs):
            params = inspect.signature(original).bind(x, *args, **kwargs).arguments
            if params.get("norm_weight") is not None:
                seen.add(x.numel() // x.shape[-1])
            return original(x, *args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(ops, name, spy(original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(ops, name, original)


def test_fold_norms_runs_no_norm_module_in_the_decode_step_and_changes_nothing_on_the_cpu(model, monkeypatch):
    """fold_norms: every residual add of the decode step goes into the GEMV before it, and at one
    row every RMSNorm into the GEMV after it (at several, where the GEMV folds a norm badly, the
    norm runs first: ops.folds_norm). On the CPU the op computes both as the modules do, so tokens
    and logits are the same bits; at batch 1 no norm module runs in a decode step."""
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "0")  # the norms at several rows as kernels
    prompts = random_prompts(6, 3, 9)
    options = dict(max_new_tokens=10, stop_token_ids=[])
    plain = Engine(model, max_batch_size=3, max_length=32)
    folded = Engine(model, max_batch_size=3, max_length=32, small_batch_linear=True, fold_norms=True)
    assert folded.stack.folded_norm is not None and all(r.folded_norms for r in folded.stack.layers)
    assert torch.equal(folded.generate(prompts, **options), plain.generate(prompts, **options))
    norm_types = (type(model.model.norm), GatedRMSNorm)  # the layers' and final norms, Mamba2's gated one
    for rows in (1, 3):
        ids, mask = left_padded(prompts[:rows])
        plain.prefill(ids, mask)
        folded.prefill(ids, mask)
        ran: list[str] = []
        hooks = [m.register_forward_hook(lambda module, args, out, name=name: ran.append(name))
                 for name, m in model.named_modules() if type(m) in norm_types]
        token = torch.tensor([5, 6, 7][:rows])
        try:
            with spy_on_gemv_norms() as normed_rows:
                got = folded.decode(token)
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(got, plain.decode(token))
        mamba_norms = [f"{name}.norm" for name, m in model.named_modules() if isinstance(m, Mamba2Mixer)]
        # One row: every norm in a GEMV, none as a module. Three: none in a GEMV, the layers'
        # norms as functions and the Mamba layers' gated norms as their modules.
        assert (ran, normed_rows) == (([], {1}) if rows == 1 else (mamba_norms, set()))
    # Nothing folds without the split-K GEMV, or into a norm of another kind.
    assert Engine(model, max_batch_size=1, max_length=8, fold_norms=True).stack.folded_norm is None
    from mambaify.generate.engine import foldable_norm

    assert foldable_norm(torch.nn.LayerNorm(8)) is None
    weight, eps = foldable_norm(model.model.norm)
    assert weight is model.model.norm.weight and eps == model.config.rms_norm_eps


def folded_engines_without_and_with_prepared_norms(model, monkeypatch, **sizes) -> tuple[Engine, Engine]:
    """Two engines with the norms folded into the split-K GEMVs, the second built with
    MAMBAIFY_PREPARED_NORMS=1 (an engine reads the switch when it is built)."""
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "0")
    plain = Engine(model, small_batch_linear=True, fold_norms=True, **sizes)
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "1")
    return plain, Engine(model, small_batch_linear=True, fold_norms=True, **sizes)


def test_prepared_norms_leave_no_norm_between_the_gemvs_at_several_rows(model, monkeypatch):
    """MAMBAIFY_PREPARED_NORMS=1 (with fold_norms): at several rows each residual-add GEMV also
    prepares the RMSNorm after it (the stream times the norm's weight, its rows' sums of
    squares), and the GEMVs after the norm read those: no layer norm runs between the GEMVs but
    the first layer's, after the embedding. The same tokens and, to float32 rounding, the same
    logits as the norms run in between; at one row nothing is prepared (the norm folds there)."""
    prompts = random_prompts(6, 3, 9)
    options = dict(max_new_tokens=10, stop_token_ids=[])
    plain, prepared = folded_engines_without_and_with_prepared_norms(model, monkeypatch, max_batch_size=3,
                                                                     max_length=32)
    runners = prepared.stack.layers
    assert all(r.prepare_norms for r in runners) and not any(r.prepare_norms for r in plain.stack.layers)
    # Prepared where the GEMV runs and the norm would not fold: 2-16 rows.
    assert [ops.prepares_norm(torch.zeros(rows, 1, 8)) for rows in (1, 2, 16, 17)] == [False, True, True, False]
    assert [r.next_norm[0] for r in runners] == [
        *(layer.input_layernorm.weight for layer in model.model.layers[1:]), model.model.norm.weight]
    assert torch.equal(prepared.generate(prompts, **options), plain.generate(prompts, **options))
    calls = {"rms_norm": 0, "prepare": 0}
    for name in calls:
        original = getattr(ops, name if name == "rms_norm" else "small_batch_linear_prepare_norm")

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(ops, name if name == "rms_norm" else "small_batch_linear_prepare_norm", counted)
    for rows in (3, 1):
        ids, mask = left_padded(prompts[:rows])
        plain.prefill(ids, mask)
        prepared.prefill(ids, mask)
        token = torch.tensor([5, 6, 7][:rows])
        for name in calls:
            calls[name] = 0
        got = prepared.decode(token)
        # Three rows: the first layer's input norm alone runs; every other norm is prepared by
        # the GEMV before it (two per layer, the last the final norm's). One row: none of it.
        assert calls == ({"rms_norm": 1, "prepare": 2 * len(runners)} if rows == 3 else {"rms_norm": 0, "prepare": 0})
        torch.testing.assert_close(got, plain.decode(token), rtol=1e-5, atol=1e-5)


def test_fused_conv_step_decodes_the_same_tokens_on_the_cpu(model, monkeypatch):
    """The default: each Mamba layer's conv step inside its SSD step (on the CPU the same two
    computations, so the same bits as with MAMBAIFY_FUSED_CONV_STEP=0), the window
    double-buffered by slot parity, over prompts whose padded widths are odd and even."""
    monkeypatch.delenv("MAMBAIFY_FUSED_CONV_STEP", raising=False)
    fused = Engine(model, max_batch_size=3, max_length=40)
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", "0")
    plain = Engine(model, max_batch_size=3, max_length=40)
    mamba = [r.mixer for r in fused.stack.layers if isinstance(r.mixer, engine_module.MambaRunner)]
    assert all(m.fused_conv for m in mamba) and not any(
        r.mixer.fused_conv for r in plain.stack.layers if isinstance(r.mixer, engine_module.MambaRunner))
    options = dict(max_new_tokens=12, stop_token_ids=[])
    for width in (9, 10):
        prompts = random_prompts(8 + width, 3, width)
        assert torch.equal(fused.generate(prompts, **options), plain.generate(prompts, **options)), width


def test_small_batch_linear_keeps_q_k_v_apart_when_they_cannot_be_read_as_one(monkeypatch):
    """q, k and v go through one grouped call only where the three weights can be read as one
    matrix (contiguous, one dtype); a transposed-storage k_proj gets a call of its own, with the
    same tokens."""
    model = tiny_teacher("llama")
    prompts = random_prompts(5, 8)
    options = dict(max_new_tokens=6, stop_token_ids=[])
    expected = Engine(model, max_batch_size=2, max_length=24).generate(prompts, **options)
    k_proj = model.model.layers[0].self_attn.k_proj
    k_proj.weight = torch.nn.Parameter(k_proj.weight.detach().t().contiguous().t())  # same values, column-major
    grouped = []
    real_qkv = ops.small_batch_qkv
    monkeypatch.setattr(ops, "small_batch_qkv",
                        lambda x, *wb, **norm: grouped.append(wb[1] is k_proj.weight) or real_qkv(x, *wb, **norm))
    fast = Engine(model, max_batch_size=2, max_length=24, small_batch_linear=True)
    assert torch.equal(fast.generate(prompts, **options), expected)
    assert grouped and not any(grouped)  # the other layers grouped; layer 0 never


def test_small_batch_linear_keeps_gate_and_up_apart_for_another_activation(monkeypatch):
    model = tiny_teacher("llama")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    prompts = random_prompts(5, 8)
    options = dict(max_new_tokens=6, stop_token_ids=[])
    expected = Engine(model, max_batch_size=2, max_length=24).generate(prompts, **options)
    gated = []
    monkeypatch.setattr(ops, "small_batch_gated_up", lambda *args: gated.append(args))
    fast = Engine(model, max_batch_size=2, max_length=24, small_batch_linear=True)
    assert torch.equal(fast.generate(prompts, **options), expected) and gated == []


def test_small_batch_linear_refuses_an_mlp_it_cannot_rebuild():
    model = tiny_teacher("llama")

    class PlainMLP(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

        def forward(self, x):
            return self.fc(x)

    model.model.layers[0].mlp = PlainMLP(model.config.hidden_size)
    Engine(model, max_batch_size=1, max_length=8)  # the modules' own forward: fine
    with pytest.raises(ValueError, match="PlainMLP has no gate_proj, up_proj, down_proj, act_fn"):
        Engine(model, max_batch_size=1, max_length=8, small_batch_linear=True)


def test_small_batch_linear_auto_takes_the_gemv_on_cuda_for_gated_mlps_only(monkeypatch):
    from mambaify.generate.engine import resolve_small_batch_linear

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llama = tiny_teacher("llama")
    hybrid = convert(tiny_teacher("llama"), attention=0.5)
    assert Engine(llama, max_batch_size=1, max_length=8).small_batch_linear is False  # the CPU: the modules'
    assert not resolve_small_batch_linear("auto", llama, cpu)
    monkeypatch.setattr(ops, "gpu_kernels_available", lambda device: device.type == "cuda")
    assert resolve_small_batch_linear("auto", llama, cuda) and resolve_small_batch_linear("auto", hybrid, cuda)
    assert not resolve_small_batch_linear(False, llama, cuda) and resolve_small_batch_linear(True, llama, cpu)
    llama.model.layers[1].mlp = torch.nn.Linear(4, 4)  # one layer it cannot rebuild: auto keeps the modules'
    assert not resolve_small_batch_linear("auto", llama, cuda)
    with pytest.raises(ValueError, match="small_batch_linear must be True, False or 'auto', got 'yes'"):
        resolve_small_batch_linear("yes", llama, cuda)
    monkeypatch.setattr(ops, "gpu_kernels_available", lambda device: False)  # no Triton on this GPU
    assert not resolve_small_batch_linear("auto", hybrid, cuda)


def test_small_batch_linear_ops_are_opaque_under_compile():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 1, 12, generator=g), torch.randn(20, 12, generator=g), torch.randn(20, generator=g)
    up = torch.randn(20, 12, generator=g)
    torch.library.opcheck(torch.ops.mambaify.small_batch_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.mambaify.small_batch_gated_up.default, (x, w, up))
    seen: list[str] = []
    compiled = torch.compile(ops.small_batch_linear, backend=recording_backend(seen), fullgraph=True)
    assert torch.equal(compiled(x, w, b), torch.nn.functional.linear(x, w, b))
    compiled_gated = torch.compile(ops.small_batch_gated_up, backend=recording_backend(seen), fullgraph=True)
    F = torch.nn.functional
    assert torch.equal(compiled_gated(x, w, up), F.silu(F.linear(x, w)) * F.linear(x, up))
    assert {"mambaify.small_batch_linear", "mambaify.small_batch_gated_up"} <= set(seen)
    # With the RMSNorm before and the residual after folded in.
    norm_w, res = torch.randn(12, generator=g), torch.randn(2, 1, 20, generator=g)
    torch.library.opcheck(torch.ops.mambaify.small_batch_linear.default, (x, w, b, norm_w, 1e-5, res))
    torch.library.opcheck(torch.ops.mambaify.small_batch_gated_up.default, (x, w, up, norm_w, 1e-5))
    torch.library.opcheck(torch.ops.mambaify.small_batch_qkv.default, (x, w, up, up, b, None, None, norm_w, 1e-5))
    torch.library.opcheck(torch.ops.mambaify.small_batch_linear.default, (x, w, b, norm_w, 1e-5, res, x.flip(-1)))
    fused = torch.compile(ops.small_batch_linear, backend=recording_backend(seen), fullgraph=True)
    assert torch.equal(fused(x, w, b, norm_w, 1e-5, res), res + F.linear(ops.rms_norm(x, norm_w, 1e-5), w, b))
    # A norm prepared by the GEMV before it: the residual stream with the next norm's inputs, and
    # the GEMVs after the norm reading them; together the norm run in between.
    h_in, w_in = torch.randn(2, 1, 20, generator=g), torch.randn(20, 12, generator=g)
    next_w = torch.randn(20, generator=g)
    torch.library.opcheck(torch.ops.mambaify.small_batch_linear_prepare_norm.default, (x, w_in, None, h_in, next_w))
    prepare = torch.compile(ops.small_batch_linear_prepare_norm, backend=recording_backend(seen), fullgraph=True)
    h, scaled, parts = prepare(x, w_in, None, h_in, next_w)
    assert torch.equal(h, h_in + F.linear(x, w_in)) and parts.shape == (1, 2)
    w_out, up_out = torch.randn(7, 20, generator=g), torch.randn(7, 20, generator=g)
    torch.library.opcheck(torch.ops.mambaify.small_batch_linear.default,
                          (scaled, w_out, None, None, 1e-5, None, None, parts))
    torch.library.opcheck(torch.ops.mambaify.small_batch_gated_up.default, (scaled, w_out, up_out, None, 1e-5, parts))
    torch.library.opcheck(torch.ops.mambaify.small_batch_qkv.default,
                          (scaled, w_out, up_out, up_out, None, None, None, None, 1e-5, parts))
    after = torch.compile(ops.small_batch_linear, backend=recording_backend(seen), fullgraph=True)
    normed = F.linear(ops.rms_norm(h, next_w, 1e-5), w_out)
    torch.testing.assert_close(after(scaled, w_out, None, None, 1e-5, None, None, parts), normed)
    assert "mambaify.small_batch_linear_prepare_norm" in seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 0.0], ids=["hybrid-50", "mamba2"])
def test_cuda_fused_conv_step_decodes_the_same_tokens(attention, monkeypatch):
    """The conv step inside the SSD step's kernel, in a CUDA graph, with the norms folded too:
    the same greedy tokens as the two kernels apart (float32)."""
    model = perturbed_hybrid(attention).cuda()
    prompts = random_prompts(7, 2, 12)
    options = dict(max_new_tokens=24, stop_token_ids=[])
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", "0")
    plain = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True, fold_norms=False)
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", "1")
    fused = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True, fold_norms=True)
    assert torch.equal(fused.generate(prompts, **options), plain.generate(prompts, **options))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 0.0, 1.0], ids=["hybrid-50", "mamba2", "llama"])
def test_cuda_fold_norms_decodes_the_same_tokens(attention):
    """The RMSNorms and residual adds inside the GEMVs, in a CUDA graph: the same greedy tokens
    as the split-K GEMV with the norms as modules (float32: the folded scale rounds differently,
    far below a token's margin)."""
    model = (tiny_teacher("llama") if attention == 1.0 else perturbed_hybrid(attention)).cuda()
    prompts = random_prompts(7, 2, 12)
    options = dict(max_new_tokens=24, stop_token_ids=[])
    folded = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True, fold_norms=True)
    plain = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True, fold_norms=False)
    assert folded.stack.folded_norm is not None
    assert torch.equal(folded.generate(prompts, **options), plain.generate(prompts, **options))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 0.0, 1.0], ids=["hybrid-50", "mamba2", "llama"])
def test_cuda_prepared_norms_decode_the_same_tokens(attention, monkeypatch):
    """MAMBAIFY_PREPARED_NORMS=1 in a CUDA graph at batch 4: each norm after a residual-add GEMV
    prepared in that GEMV's launch, the same greedy tokens as the norms run between the GEMVs
    (float32)."""
    model = (tiny_teacher("llama") if attention == 1.0 else perturbed_hybrid(attention)).cuda()
    prompts = random_prompts(7, 4, 12)
    options = dict(max_new_tokens=24, stop_token_ids=[])
    plain, prepared = folded_engines_without_and_with_prepared_norms(model, monkeypatch, max_batch_size=4,
                                                                     max_length=48)
    assert all(r.prepare_norms for r in prepared.stack.layers)
    assert torch.equal(prepared.generate(prompts, **options), plain.generate(prompts, **options))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [0.5, 1.0], ids=["hybrid-50", "llama"])
def test_cuda_small_batch_linear_decodes_as_the_modules_do(attention):
    # float32: the split-K kernel and cuBLAS round differently but far below a token's margin.
    model = (tiny_teacher("llama") if attention == 1.0 else perturbed_hybrid(attention)).cuda()
    prompts = random_prompts(7, 2, 12)
    options = dict(max_new_tokens=24, stop_token_ids=[])
    fast = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True)
    plain = Engine(model, max_batch_size=4, max_length=48)
    assert torch.equal(fast.generate(prompts, **options), plain.generate(prompts, **options))
    ids, mask = left_padded(prompts)
    fast.prefill(ids, mask)
    plain.prefill(ids, mask)
    token = torch.tensor([5, 6, 7], device="cuda")
    assert torch.allclose(fast.decode(token), plain.decode(token), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper-or-later GPU")
def test_cuda_programmatic_dependent_launch_decodes_the_same_tokens(monkeypatch):
    """MAMBAIFY_PDL=1: the graphed step with mambaify's kernels (split-K GEMV, SSD and conv
    steps, gated norm, split-K attention) launched early, each waiting for the kernel ahead
    before it reads its inputs or writes anything, gives the tokens of the same step launched
    one kernel after another, in float32. Uncompiled, so that nothing but launches differs
    (the speculative engine's test runs it compiled, inductor's kernels included)."""
    model = perturbed_hybrid(0.5).cuda()
    prompts = random_prompts(7, 2, 12)
    options = dict(max_new_tokens=24, stop_token_ids=[])
    monkeypatch.setenv("MAMBAIFY_PDL", "0")
    expected = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True).generate(prompts, **options)
    monkeypatch.setenv("MAMBAIFY_PDL", "1")
    early = Engine(model, max_batch_size=4, max_length=48, small_batch_linear=True)
    assert torch.equal(early.generate(prompts, **options), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exactly_sized_engine_prefills_from_a_graph():
    """On CUDA an engine sized exactly to its request (prompt + max_new_tokens = max_length)
    pads a short prompt into its pad slots and replays the prefill from a graph (session 8's
    bench_speculative engines prefilled every prompt eagerly): the same tokens as an engine with
    room to spare."""
    model = perturbed_hybrid(0.5).cuda()
    prompts = random_prompts(7, 12)  # two prompts for an engine of max_batch_size=2
    width = max(len(p) for p in prompts)
    tight = Engine(model, max_batch_size=2, max_length=width + 20)
    roomy = Engine(model, max_batch_size=2, max_length=512)
    assert tight.pad_slots == engine_module.PREFILL_PAD_SLOTS
    options = dict(max_new_tokens=20, stop_token_ids=[])
    assert torch.equal(tight.generate(prompts, **options), roomy.generate(prompts, **options))
    assert tight.prefill_counts == {"graphed": 1, "eager": 0}


def test_bench_small_batch_linear_flag_labels_and_compares_alike(tmp_path):
    from mambaify import bench

    argv = ["--families", "tiny", "--attention", "1,0", "--batch", "1", "--context", "16", "--new-tokens", "2",
            "--repeats", "1", "--hf-batch", "none", "--device", "cpu", "--out"]
    with pytest.MonkeyPatch.context() as env:  # the decode fusions off: each a variant of its own below
        env.setenv("MAMBAIFY_FOLD_NORMS", "0")
        env.setenv("MAMBAIFY_FUSED_CONV_STEP", "0")
        assert cli_main(["bench", "--small-batch-linear", *argv, str(tmp_path / "gemv")]) == 0
        assert cli_main(["bench", *argv, str(tmp_path / "plain")]) == 0
        doc = json.loads((tmp_path / "gemv" / "bench.json").read_text())
        assert doc["meta"]["options"]["small_batch_linear"] is True
        assert [p["decode_linear"] for p in doc["points"]] == ["split-K", "split-K"]
        assert "| hybrid-0% | engine (split-K linear) | 1 | 16 |" in (tmp_path / "gemv" / "bench.md").read_text()
        # The engines' norms folded into the GEMVs (the default; 0 turns it off).
        env.delenv("MAMBAIFY_FOLD_NORMS")
        assert cli_main(["bench", "--small-batch-linear", *argv, str(tmp_path / "folded")]) == 0
        folded = json.loads((tmp_path / "folded" / "bench.json").read_text())
        assert [p["decode_linear"] for p in folded["points"]] == ["split-K + norms"] * 2
        folded_md = (tmp_path / "folded" / "bench.md").read_text()
        assert "| hybrid-0% | engine (split-K linear, norms folded) | 1 | 16 |" in folded_md
        # The conv step inside the SSD step (the default too).
        env.delenv("MAMBAIFY_FUSED_CONV_STEP")
        assert cli_main(["bench", *argv, str(tmp_path / "fused")]) == 0
    assert "| hybrid-0% | engine (conv in SSD step) | 1 | 16 |" in (tmp_path / "fused" / "bench.md").read_text()
    merged = bench.render_from_json([tmp_path / "gemv" / "bench.json", tmp_path / "plain" / "bench.json"],
                                    tmp_path / "all")
    # Each hybrid is compared with the teacher run the same way.
    gemv_teacher, gemv_hybrid, plain_teacher, plain_hybrid = merged["points"]
    assert gemv_hybrid["decode_vs_teacher"] == pytest.approx(gemv_hybrid["decode_tok_s"] / gemv_teacher["decode_tok_s"])
    assert plain_hybrid["decode_vs_teacher"] == pytest.approx(
        plain_hybrid["decode_tok_s"] / plain_teacher["decode_tok_s"])


def test_compiled_decode_step_gives_its_greedy_tokens():
    """Compiled, the decode step also returns each row's greedy token (the two-stage argmax of
    greedy_tokens inside its graph, over a vocabulary of several chunks here): decode_greedy and
    greedy generation use them, and they are the argmax of the logits. Uncompiled, the step
    leaves the argmax to the caller."""
    from mambaify.generate.sampling import ARGMAX_CHUNK

    model = perturbed_hybrid(0.5, num_hidden_layers=2, vocab_size=5 * ARGMAX_CHUNK + 7)
    prompts = random_prompts(9, 3, 7)
    compiled = Engine(model, max_batch_size=3, max_length=32, compile=True)
    eager = Engine(model, max_batch_size=3, max_length=32)
    options = dict(max_new_tokens=6, stop_token_ids=[])
    assert torch.equal(compiled.generate(prompts, **options), eager.generate(prompts, **options))
    assert compiled.is_compiled(3)
    ids, mask = left_padded(prompts)
    compiled.prefill(ids, mask)
    eager.prefill(ids, mask)
    token = torch.tensor([5, 6, 7])
    greedy = compiled.decode_greedy(token)
    assert compiled._request.decoder.greedy is greedy  # the step's own output
    logits = eager.decode(token)
    assert eager._request.decoder.greedy is None
    assert torch.equal(greedy, logits.argmax(-1))


def test_compiled_small_batch_linear_equals_eager(monkeypatch):
    model = perturbed_hybrid(0.5, num_hidden_layers=2)
    prompts = random_prompts(7, 3)
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", "0")
    compiled = Engine(model, max_batch_size=2, max_length=32, compile=True, small_batch_linear=True, fold_norms=False)
    eager = Engine(model, max_batch_size=2, max_length=32)
    options = dict(max_new_tokens=8, stop_token_ids=[])
    expected = eager.generate(prompts, **options)
    assert torch.equal(compiled.generate(prompts, **options), expected)
    assert compiled.is_compiled(2) and compiled.compile_error is None
    # The norms folded into the GEMVs (the ops' extra operands) compile too.
    folded = Engine(model, max_batch_size=2, max_length=32, compile=True, small_batch_linear=True, fold_norms=True)
    assert torch.equal(folded.generate(prompts, **options), expected)
    assert folded.is_compiled(2) and folded.compile_error is None
    # And the conv step inside the SSD step's op.
    monkeypatch.setenv("MAMBAIFY_FUSED_CONV_STEP", "1")
    fused = Engine(model, max_batch_size=2, max_length=32, compile=True, small_batch_linear=True, fold_norms=True)
    assert torch.equal(fused.generate(prompts, **options), expected)
    assert fused.is_compiled(2) and fused.compile_error is None
    # And the norms at two rows prepared by the GEMVs before them (three tensors out of one op,
    # carried between the layers): one graph still, no break.
    monkeypatch.setenv("MAMBAIFY_PREPARED_NORMS", "1")
    prepared = Engine(model, max_batch_size=2, max_length=32, compile=True, small_batch_linear=True, fold_norms=True)
    assert torch.equal(prepared.generate(prompts, **options), expected)
    assert prepared.is_compiled(2) and prepared.compile_error is None
