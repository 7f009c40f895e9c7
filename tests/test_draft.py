"""Drafts for speculative decoding: built from the teacher's layers, pure Mamba2, any compatible
causal LM; trained against the target with the distillation tooling (resume, CLI)."""

import argparse
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaModel

from mambaify import convert
from mambaify.distill.data import tokenize_text
from mambaify.distill.losses import token_metrics
from mambaify.distill.trainer import RunInterrupted
from mambaify.draft import (
    DraftConfig,
    add_distill_draft_arguments,
    build_draft_from_teacher,
    check_draft_compatible,
    distill_draft,
    run_distill_draft,
)
from mambaify.models.modeling import HybridForCausalLM
from mambaify.teachers import load_teacher
from tests.conftest import tiny_teacher


def reference_forward(source, layers, ids):
    """The source's embedding -> its layers ``layers`` in order -> final norm -> LM head, by hand."""
    inner = source.model
    h = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(h, position_ids=positions)
    for i in layers:  # no mask: sdpa runs causal, as the model does for an unpadded batch
        h = inner.layers[i](h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return source.lm_head(inner.norm(h))


def round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@torch.no_grad()
def test_first_and_last_layer_draft_is_the_teachers_forward_bit_for_bit(family, tmp_path):
    teacher = tiny_teacher(family)
    rng_before = torch.get_rng_state()
    draft = build_draft_from_teacher(teacher)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the random init did not move the caller's RNG
    assert type(draft) is type(teacher) and draft.config.num_hidden_layers == 2
    ids = torch.randint(3, 97, (2, 13))
    logits = draft(ids).logits
    assert torch.equal(logits, reference_forward(teacher, [0, 3], ids))
    assert torch.equal(build_draft_from_teacher(teacher, [0, -1])(ids).logits, logits)
    assert torch.equal(build_draft_from_teacher(teacher, [1, 2])(ids).logits, reference_forward(teacher, [1, 2], ids))

    loaded = round_trip(draft, tmp_path)
    assert type(loaded) is type(teacher)
    assert torch.equal(loaded(ids).logits, logits)


@torch.no_grad()
def test_draft_of_a_hybrid_keeps_attention_and_mamba_layers(tmp_path):
    hybrid = convert(tiny_teacher("qwen2"), attention=0.5)  # attention at 1, 3; Mamba at 0, 2
    draft = build_draft_from_teacher(hybrid, [0, 2, 3])
    assert isinstance(draft, HybridForCausalLM)
    assert draft.config.attn_layers == [2] and draft.config.layer_types == ["full_attention"] * 3
    assert [layer.is_attention for layer in draft.model.layers] == [False, False, True]
    ids = torch.randint(3, 97, (2, 13))
    logits = draft(ids, use_cache=False).logits
    assert torch.equal(logits, reference_forward(hybrid, [0, 2, 3], ids))
    assert torch.equal(round_trip(draft, tmp_path)(ids, use_cache=False).logits, logits)


@torch.no_grad()
def test_tied_head_stays_tied_and_dtype_is_applied(tmp_path):
    from tests._tiny_teachers import tiny_llama

    teacher = tiny_llama(tie_word_embeddings=True)
    draft = build_draft_from_teacher(teacher, [1])
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()
    assert torch.equal(draft.lm_head.weight, teacher.lm_head.weight)
    loaded = round_trip(draft, tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 200, (1, 9))
    assert torch.equal(loaded(ids).logits, reference_forward(teacher, [1], ids))
    half = build_draft_from_teacher(teacher, [0], dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert next(teacher.parameters()).dtype == torch.float32


@torch.no_grad()
def test_pure_mamba_draft_starts_as_the_picked_attention_layers(family, tmp_path):
    teacher = tiny_teacher(family)
    draft = build_draft_from_teacher(teacher, attention=0.0)
    assert isinstance(draft, HybridForCausalLM) and draft.config.attn_layers == []
    assert not any(hasattr(layer, "self_attn") for layer in draft.model.layers)
    assert not any("self_attn" in name for name, _ in draft.named_parameters())
    for j, i in enumerate([0, 3]):
        attn, mixer = teacher.model.layers[i].self_attn, draft.model.layers[j].mamba
        rows, w = mixer.in_proj_slices, mixer.in_proj.weight
        assert torch.equal(w[rows["C"]], attn.q_proj.weight)
        assert torch.equal(w[rows["B"]], attn.k_proj.weight)
        assert torch.equal(w[rows["x"]], attn.v_proj.weight)
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        if attn.q_proj.bias is not None:
            assert torch.equal(mixer.in_proj.bias[rows["C"]], attn.q_proj.bias)
        assert torch.equal(draft.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)
    assert torch.equal(draft.lm_head.weight, teacher.lm_head.weight)
    ids = torch.randint(3, 97, (2, 11))
    logits = draft(ids, use_cache=False).logits
    loaded = round_trip(draft, tmp_path)
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.attn_layers == []
    assert torch.equal(loaded(ids, use_cache=False).logits, logits)


def test_bad_layer_indices_are_named():
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match=r"\[4\] out of range: the source has 4 layers"):
        build_draft_from_teacher(teacher, [0, 4])
    with pytest.raises(ValueError, match=r"out of range"):
        build_draft_from_teacher(teacher, [-5])
    with pytest.raises(ValueError, match="same layer twice"):
        build_draft_from_teacher(teacher, [3, -1])
    with pytest.raises(ValueError, match=r"increasing order.*\[0, 3\]"):
        build_draft_from_teacher(teacher, [-1, 0])
    with pytest.raises(ValueError, match="at least one layer"):
        build_draft_from_teacher(teacher, [])
    with pytest.raises(TypeError, match="integers"):
        build_draft_from_teacher(teacher, [0, True])
    with pytest.raises(ValueError, match="'all'"):
        build_draft_from_teacher(teacher, "first")
    assert build_draft_from_teacher(teacher, "all").config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="cannot build a draft from"):
        build_draft_from_teacher(LlamaModel(LlamaConfig(**{k: v for k, v in teacher.config.to_dict().items()
                                                           if k in ("vocab_size", "hidden_size", "num_attention_heads")},
                                                        num_hidden_layers=1, intermediate_size=8)))


def test_compatibility_check_names_the_mismatch_and_the_fix():
    from tests._tiny_data import tiny_tokenizer as data_tokenizer
    from tests._tiny_teachers import tiny_tokenizer as teacher_tokenizer

    target = tiny_teacher("llama")
    check_draft_compatible(target, build_draft_from_teacher(target, [2]))
    check_draft_compatible(target, tiny_teacher("qwen2"))  # any causal LM with the same vocabulary
    with pytest.raises(ValueError, match=r"vocabulary sizes differ: the target's LM head has 97 outputs, the draft's 101"):
        check_draft_compatible(target, tiny_teacher("llama", vocab_size=101))
    with pytest.raises(ValueError, match="no language-model head"):
        check_draft_compatible(target, target.model)

    ours, theirs = teacher_tokenizer(), data_tokenizer()
    big = tiny_teacher("llama", vocab_size=max(len(ours), len(theirs)))
    check_draft_compatible(big, big, ours, teacher_tokenizer())
    with pytest.raises(ValueError, match="tokenizer differs from the target's.*share one tokenizer"):
        check_draft_compatible(big, big, ours, theirs)
    with pytest.raises(ValueError, match=r"resize_token_embeddings\(%d\)" % len(ours)):
        check_draft_compatible(tiny_teacher("llama", vocab_size=len(ours)), big, ours, teacher_tokenizer())
    with pytest.raises(ValueError, match="its LM head only 97 outputs"):
        check_draft_compatible(target, target, ours)


# ---------------------------------------------------------------------------------------------
# Training

HELDOUT = [
    "Rivers carry water from the mountains down to the sea.",
    "A library lends books, music and films to the people of a town.",
    "The violin has four strings and is played with a bow.",
]


def draft_config(teacher_dir, data_files, out, **overrides):
    chats, texts = data_files
    base = dict(teacher=str(teacher_dir), out=str(out), data=str(chats), eval_data=str(texts), layers=[1],
                tokens=5 * 2 * 64, seq_len=64, batch_size=2, eval_texts=6, eval_chats=0, eval_generations=0,
                progress=False, save_every=2, lr=3e-3, device="cpu")
    base.update(overrides)
    return DraftConfig(**base)


@torch.no_grad()
def heldout_kl(draft, target, tokenizer) -> float:
    kls = []
    for text in HELDOUT:
        doc = tokenize_text(tokenizer, text)
        ids = torch.tensor([doc["input_ids"]])
        m = token_metrics(draft(ids).logits, target(ids).logits, ids, torch.tensor([doc["loss_mask"]]))
        kls.append(m["kl"])
    return float(torch.cat(kls).mean())


def test_distill_draft_lowers_kl_and_trains_every_parameter(teacher_dir, data_files, tmp_path):
    metrics = distill_draft(draft_config(teacher_dir, data_files, tmp_path / "run", tokens=20 * 2 * 64))
    target, tokenizer = load_teacher(str(teacher_dir))
    built = build_draft_from_teacher(target, [1])  # what the run started from: the teacher's last layer
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert type(trained) is type(target) and trained.config.num_hidden_layers == 1
    check_draft_compatible(target, trained, tokenizer, AutoTokenizer.from_pretrained(tmp_path / "run" / "model"))

    assert heldout_kl(trained, target, tokenizer) < 0.85 * heldout_kl(built, target, tokenizer)
    assert metrics["after"]["text"]["kl"] < metrics["before"]["text"]["kl"]
    before, after = built.state_dict(), trained.state_dict()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that did not train: {unchanged}"

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(r["ce"] > 0 and r["kl"] > 0 for r in records)
    assert metrics["draft"]["source_layers"] == [1] and metrics["draft"]["class"] == "LlamaForCausalLM"
    assert "top-1 agreement" in (run / "report.md").read_text()


def test_draft_saved_with_its_frequent_tokens_generates_the_targets_tokens(teacher_dir, data_files, tmp_path):
    """--draft-vocab N saves the N tokens most frequent in the training data (and the stop
    tokens) beside the draft; an engine that cuts the draft's head to them still decodes the
    target's own greedy tokens, and a damaged file is named."""
    from mambaify.generate.speculative_engine import DRAFT_VOCAB_FILE, SpeculativeEngine, saved_draft_vocab

    out = tmp_path / "run"
    distill_draft(draft_config(teacher_dir, data_files, out, draft_vocab=16))
    saved = json.loads((out / "model" / DRAFT_VOCAB_FILE).read_text())
    ids = saved_draft_vocab(out / "model")
    assert ids == saved["token_ids"] == sorted(set(ids)) and 16 <= len(ids) <= 20
    target, tokenizer = load_teacher(str(teacher_dir))
    assert tokenizer.eos_token_id in ids and max(ids) < target.config.vocab_size
    draft = AutoModelForCausalLM.from_pretrained(out / "model")  # the checkpoint itself is a plain model
    prompt = torch.tensor([tokenizer("The violin has four")["input_ids"]])
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    engine = SpeculativeEngine(target, draft, k=3, max_batch_size=1, max_length=64, draft_vocab=ids)
    assert torch.equal(engine.generate(prompt, max_new_tokens=10, stop_token_ids=[]), expected)
    assert saved_draft_vocab(tmp_path) is None  # no file: the whole head
    (out / "model" / DRAFT_VOCAB_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a draft vocabulary"):
        saved_draft_vocab(out / "model")
    with pytest.raises(ValueError, match="draft_vocab must be >= 0"):
        draft_config(teacher_dir, data_files, out, draft_vocab=-1).validate()


def test_resume_after_interruption_gives_the_same_draft(teacher_dir, data_files, tmp_path):
    distill_draft(draft_config(teacher_dir, data_files, tmp_path / "full"))
    with pytest.raises(RunInterrupted):
        distill_draft(draft_config(teacher_dir, data_files, tmp_path / "cut"), stop_after_steps=3)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="already holds a run"):
        distill_draft(draft_config(teacher_dir, data_files, tmp_path / "cut"))
    with pytest.raises(ValueError, match="different options than the run.*layers"):
        distill_draft(draft_config(teacher_dir, data_files, tmp_path / "cut", layers=[0]), resume=True)
    metrics = distill_draft(draft_config(teacher_dir, data_files, tmp_path / "cut"), resume=True)
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert metrics["before"]["text"]["kl"] > metrics["after"]["text"]["kl"]  # "before" survived the interruption


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mambaify distill-draft")
    add_distill_draft_arguments(parser)
    return run_distill_draft(parser.parse_args(argv))


def test_cli_distill_draft_end_to_end(teacher_dir, data_files, tmp_path, capsys):
    chats, texts = data_files
    options = tmp_path / "draft.yaml"
    options.write_text(yaml.safe_dump({"eval_texts": 4, "eval_chats": 0, "eval_generations": 0, "seq_len": 64,
                                       "batch_size": 2}))
    common = ["--config", str(options), "--data", str(chats), "--eval-data", str(texts), "--tokens", "256",
              "--device", "cpu", "--no-progress"]

    # A Transformer draft from the teacher's last layer.
    assert run_cli(["--target", str(teacher_dir), "--out", str(tmp_path / "t"), "--layers=-1", *common]) == 0
    out = capsys.readouterr().out
    assert "KL(target||draft)" in out and f"{tmp_path / 't'}/model" in out
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "model")
    assert type(draft).__name__ == "LlamaForCausalLM" and draft.config.num_hidden_layers == 1
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert saved["layers"] == [-1] and saved["stage"] == "e2e" and saved["eval_texts"] == 4

    # A pure-Mamba2 draft for a hybrid target, its layers taken from the teacher.
    teacher, tokenizer = load_teacher(str(teacher_dir))
    hybrid_dir = tmp_path / "hybrid"
    convert(teacher, attention=0.5).save_pretrained(hybrid_dir)
    tokenizer.save_pretrained(hybrid_dir)
    assert run_cli(["--target", str(hybrid_dir), "--draft-from", str(teacher_dir), "--mamba",
                    "--out", str(tmp_path / "m"), *common]) == 0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model")
    assert isinstance(draft, HybridForCausalLM) and draft.config.attn_layers == []
    assert draft.config.num_hidden_layers == 2
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["draft"]["source"] == str(teacher_dir) and metrics["config"]["teacher"] == str(hybrid_dir)

    # Bad input: a clear error before anything is written.
    with pytest.raises(ValueError, match=r"\[7\] out of range: the source has 2 layers"):
        run_cli(["--target", str(teacher_dir), "--out", str(tmp_path / "bad"), "--layers", "0,7", *common])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        run_cli(["--layers", "first,last"])
    assert "--layers takes comma-separated layer indices" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stage e2e"):
        DraftConfig(stage="stage1").validate()


def test_default_target_is_the_default_teacher():
    parser = argparse.ArgumentParser()
    add_distill_draft_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    assert args.teacher is None  # not given: DraftConfig's default applies, as for `mambaify distill`
    assert DraftConfig().teacher == "smollm2-135m-instruct"
    assert parser.parse_args(["--target", "smollm2-135m-instruct"]).teacher == "smollm2-135m-instruct"


@pytest.mark.slow
def test_default_teacher_draft_is_its_first_and_last_layer(real_teacher_cache, tmp_path):
    teacher, tokenizer = load_teacher("smollm2-135m-instruct")
    draft = build_draft_from_teacher(teacher)
    assert type(draft).__name__ == "LlamaForCausalLM" and draft.config.num_hidden_layers == 2
    assert draft.config.tie_word_embeddings == teacher.config.tie_word_embeddings
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = draft(ids).logits
        assert torch.equal(logits, reference_forward(teacher, [0, 29], ids))
        loaded = round_trip(draft, tmp_path)
        assert torch.equal(loaded(ids).logits, logits)
    check_draft_compatible(teacher, loaded, tokenizer, tokenizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attention", [None, 0.0], ids=["transformer", "mamba"])
def test_distill_draft_on_the_gpu(teacher_dir, data_files, tmp_path, attention, compile_):
    """The GPU path: bf16 autocast, a bf16 target, float32 master weights (Triton/fla kernels for
    Mamba); with compile, the training steps through torch.compile."""
    out = tmp_path / "gpu"
    metrics = distill_draft(draft_config(teacher_dir, data_files, out, device="auto", tokens=20 * 2 * 64,
                                         attention=attention, compile=compile_))
    assert metrics["device"].startswith("cuda")
    assert metrics["after"]["text"]["kl"] < metrics["before"]["text"]["kl"]
    draft = AutoModelForCausalLM.from_pretrained(out / "model")
    assert {p.dtype for p in draft.parameters()} == {torch.float32}
    assert isinstance(draft, HybridForCausalLM) == (attention is not None)


def test_draft_init_script_scores_layer_choices(teacher_dir, capsys):
    """benchmarks/draft_init.py: a draft of all the teacher's layers is the teacher (KL 0,
    agreement 1 when the teacher is the target); a draft of fewer layers is not."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "draft_init.py"
    module_spec = importlib.util.spec_from_file_location("draft_init", path)
    draft_init = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(draft_init)

    layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    every = ",".join(str(i) for i in range(layers))
    assert layers > 1
    assert draft_init.main(["--target", str(teacher_dir), "--teacher", str(teacher_dir), "--layers", f"{every};0",
                            "--texts", "3", "--tokens", "24"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layers ")]
    assert lines[0] == f"layers {every}: KL 0.00, top-1 agreement 1.000"
    assert lines[1].startswith("layers 0: KL ") and lines[1] != "layers 0: KL 0.00, top-1 agreement 1.000"
