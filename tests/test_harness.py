"""Saved hybrids outside mambaify's own process: trust_remote_code loading, lm-eval's command line,
and `mambaify eval --tasks` (lm-evaluation-harness on model and teacher) on a task over local data."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mambaify import convert
from mambaify.cli import main as cli_main
from mambaify.eval.harness import parse_tasks, scores_table
from mambaify.teachers import load_teacher

PROMPT = [[1, 5, 6, 7, 9]]


@pytest.fixture(scope="module")
def saved_hybrid(teacher_dir, tmp_path_factory):
    teacher, tokenizer = load_teacher(str(teacher_dir))
    hybrid = convert(teacher, attention=0.5, seed=0)
    path = tmp_path_factory.mktemp("hybrid") / "model"
    hybrid.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with torch.no_grad():
        torch.save(hybrid(torch.tensor(PROMPT)).logits, path.parent / "logits.pt")
    return path


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """An lm-eval multiple-choice task over a local JSONL file (no hub, no network)."""
    folder = tmp_path_factory.mktemp("tasks")
    words = [("hello", "world", "moon"), ("good", "morning", "rock"), ("thank", "you", "blue"),
             ("once", "upon", "table"), ("new", "york", "seven"), ("ice", "cream", "door"),
             ("peanut", "butter", "lamp"), ("fish", "chips", "cloud")]
    with (folder / "next_word.jsonl").open("w") as f:
        for i, (word, right, wrong) in enumerate(words):
            choices = [right, wrong] if i % 2 == 0 else [wrong, right]
            f.write(json.dumps({"question": f"Which word comes after {word}?", "choices": choices,
                                "label": choices.index(right)}) + "\n")
    (folder / "next_word.yaml").write_text(textwrap.dedent(f"""\
        task: next_word
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "next_word.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return folder


def fresh_python(code: str, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that has not imported mambaify (offline, own module cache)."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def test_a_saved_hybrid_loads_with_trust_remote_code_where_mambaify_is_not_imported(saved_hybrid, tmp_path):
    assert {"configuration_mambaify.py", "modeling_mambaify.py"} <= {p.name for p in saved_hybrid.iterdir()}
    done = fresh_python(textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(saved_hybrid)!r})
        except ValueError as err:
            assert "trust_remote_code=True" in str(err), err
        else:
            raise AssertionError("loaded custom code without being trusted to")
        assert "mambaify" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(saved_hybrid)!r}, trust_remote_code=True)
        assert type(model).__module__ == "mambaify.models.modeling", type(model)
        with torch.no_grad():
            assert torch.equal(model(torch.tensor({PROMPT})).logits, torch.load({str(saved_hybrid.parent / "logits.pt")!r}))
        model.save_pretrained({str(tmp_path / "again")!r})
        """), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # Saved again from there: the same two modules, no copy of mambaify's source beside them.
    assert sorted(p.name for p in (tmp_path / "again").glob("*.py")) == ["configuration_mambaify.py",
                                                                        "modeling_mambaify.py"]
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_mambaify.HybridForCausalLM"


def test_eval_tasks_scores_model_and_teacher_as_lm_eval_itself_does(saved_hybrid, teacher_dir, local_task, tmp_path):
    out = tmp_path / "eval"
    assert cli_main(["eval", str(saved_hybrid), "--teacher", str(teacher_dir), "--num-texts", "2", "--num-chats", "1",
                     "--out", str(out), "--tasks", "next_word", "--tasks-include", str(local_task),
                     "--tasks-batch-size", "4"]) == 0
    scores = json.loads((out / "metrics.json").read_text())["tasks"]
    assert set(scores["model"]["next_word"]) == {"acc", "acc_norm"}
    report = (out / "report.md").read_text()
    assert "## lm-evaluation-harness (zero-shot)" in report and "| next_word | acc |" in report
    assert (out / "tasks.png").is_file()

    # lm-eval's own command line on the saved folder (trust_remote_code) and on the teacher's.
    for who, path in (("model", saved_hybrid), ("teacher", teacher_dir)):
        (tmp_path / who).mkdir()
        done = fresh_python(textwrap.dedent(f"""
            import json, sys
            from lm_eval.__main__ import cli_evaluate
            sys.argv = ["lm_eval", "--model", "hf", "--model_args", "pretrained={path},trust_remote_code=True",
                        "--tasks", "next_word", "--include_path", {str(local_task)!r}, "--device", "cpu",
                        "--batch_size", "4", "--output_path", "results"]
            cli_evaluate()
            """), tmp_path / who)
        assert done.returncode == 0, done.stderr[-3000:]
        [written] = (tmp_path / who / "results").rglob("results_*.json")
        theirs = json.loads(written.read_text())["results"]["next_word"]
        for metric in ("acc", "acc_norm"):
            assert scores[who]["next_word"][metric]["value"] == pytest.approx(theirs[f"{metric},none"], abs=1e-12)


def test_eval_refuses_unknown_tasks_before_loading_anything(saved_hybrid, tmp_path, capsys):
    code = cli_main(["eval", str(saved_hybrid), "--teacher", "no-such-teacher", "--tasks", "hellaswag,no_such_task",
                     "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown lm-eval task(s) no_such_task" in err and "--tasks-include" in err
    assert not (tmp_path / "eval").exists()


def test_eval_without_lm_eval_names_the_install(saved_hybrid, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    code = cli_main(["eval", str(saved_hybrid), "--teacher", "no-such-teacher", "--tasks", "hellaswag",
                     "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "mambaify[eval]"' in err and "Traceback" not in err


def test_task_lists_and_score_tables():
    assert parse_tasks(" hellaswag, arc_easy,,hellaswag ") == ["hellaswag", "arc_easy"]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_tasks(" , ")
    teacher = {"t": {"acc": {"value": 0.5, "stderr": 0.1}}}
    model = {"t": {"acc": {"value": 0.25, "stderr": None}, "f1": {"value": 0.3, "stderr": None}}}
    assert scores_table(teacher, model)[2:] == ["| t | acc | 0.5000 ± 0.1000 | 0.2500 | 0.500 |",
                                                "| t | f1 | - | 0.3000 | - |"]
