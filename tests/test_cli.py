"""`mambaify convert` on a tiny local teacher: the happy path and every kind of bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from mambaify.cli import main as cli_main
from tests._tiny_data import tiny_tokenizer


def run(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_writes_a_loadable_hybrid(teacher_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "convert", teacher_dir, tmp_path / "h", "--attention", "1,")  # index 1, not 100%
    assert code == 0 and "1/2 attention layers [1]" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert model.config.attn_layers == [1]
    assert (tmp_path / "h" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".h.tmp-*"))  # the temporary folder was renamed into place
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "Cannot find teacher"),
        (["no-such-teacher", "{out}"], "smollm2-135m-instruct"),
        (["{teacher}", "{out}", "--attention", "0,5"], "out of range"),
        (["{teacher}", "{out}", "--attention", "1.5"], "[0, 1]"),
        (["{teacher}", "{out}", "--attention", "half"], "--attention"),
        (["{gpt2}", "{out}"], "llama, mistral, qwen2"),
        (["{teacher}", "{taken}"], "not empty"),
    ],
)
def test_bad_input_gets_one_line_and_no_overwrite(teacher_dir, tmp_path, capsys, args, message):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    names = dict(missing=tmp_path / "nowhere", out=tmp_path / "out", teacher=teacher_dir, gpt2=gpt2, taken=taken)
    capsys.readouterr()  # drop what the set-up printed
    code, _, err = run(capsys, "convert", *[a.format(**names) for a in args])
    assert code == 2
    # Progress bars may precede it; the error itself is exactly one line.
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("mambaify convert: error:") and message in lines[0], err
    assert "Traceback" not in err
    assert (taken / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "distill-draft"])
def test_a_model_folder_without_tokenizer_is_named_with_the_fix(teacher_dir, tmp_path, capsys, command):
    code, _, _ = run(capsys, "convert", teacher_dir, tmp_path / "h", "--attention", "0.5")
    assert code == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "h" / name).unlink(missing_ok=True)
    args = {"generate": ["generate", tmp_path / "h", "hello"],
            "distill-draft": ["distill-draft", "--target", tmp_path / "h", "--out", tmp_path / "d"]}[command]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert f"no tokenizer in {tmp_path / 'h'}" in err and "save_pretrained" in err, err
    assert not (tmp_path / "d").exists()
