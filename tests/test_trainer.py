"""The distillation run on a tiny teacher: freezing, resume, schedules, packing, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mambaify import convert
from mambaify.cli import main as cli_main
from mambaify.distill.data import DataError, collate, pack_documents
from mambaify.distill.losses import distill_loss
from mambaify.distill.schedule import plan_stages
from mambaify.distill.trainer import DistillConfig, RunInterrupted, distill
from mambaify.teachers import load_teacher


def config(teacher_dir, data_files, out, **overrides):
    chats, texts = data_files
    base = dict(teacher=str(teacher_dir), out=str(out), data=str(chats), eval_data=str(texts),
                tokens=5 * 2 * 64, seq_len=64, batch_size=2, eval_texts=6, eval_chats=0, eval_generations=0,
                progress=False, save_every=2, lr=3e-3, device="cpu")
    base.update(overrides)
    return DistillConfig(**base)


def weights(run_dir, sub="model"):
    return load_file(str(run_dir / sub / "model.safetensors"))


def test_stage1_trains_only_mamba_and_improves(teacher_dir, data_files, tmp_path):
    cfg = config(teacher_dir, data_files, tmp_path / "run")
    metrics = distill(cfg)
    teacher, _ = load_teacher(str(teacher_dir))
    converted = convert(teacher, attention=0.5, seed=0, init=cfg.init).state_dict()  # the student at step 0
    trained = weights(tmp_path / "run")
    changed = [n for n in converted if not torch.equal(converted[n], trained[n])]
    assert changed and all(".mamba." in n for n in changed)
    frozen = [n for n in converted if ".mamba." not in n]
    assert all(torch.equal(converted[n], trained[n]) for n in frozen if n in trained)
    before, after = metrics["before"]["text"], metrics["after"]["text"]
    assert after["kl"] < before["kl"]
    for name in ("report.md", "metrics.json", "metrics.jsonl", "config.yaml", "loss_curve.png", "before_after.png"):
        assert (tmp_path / "run" / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["tokens_per_s"] > 0 for r in records)

    # `mambaify eval` measures the saved student the same way, on the built-in held-out data.
    assert cli_main(["eval", str(tmp_path / "run" / "model"), "--teacher", str(teacher_dir),
                     "--num-texts", "4", "--num-chats", "2", "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["text"]["tokens"] > 0 and evaluated["chat"]["tokens"] > 0
    assert "| text |" in (tmp_path / "eval" / "report.md").read_text()


def test_resume_after_interruption_gives_the_same_weights(teacher_dir, data_files, tmp_path):
    distill(config(teacher_dir, data_files, tmp_path / "full"))
    with pytest.raises(RunInterrupted):
        distill(config(teacher_dir, data_files, tmp_path / "cut"), stop_after_steps=3)  # checkpoint at 2
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="already holds a run"):
        distill(config(teacher_dir, data_files, tmp_path / "cut"))
    with pytest.raises(ValueError, match="different options"):
        distill(config(teacher_dir, data_files, tmp_path / "cut", lr=1e-2), resume=True)
    # The command line need not repeat the run's options: --resume starts from its config.yaml.
    assert cli_main(["distill", "--resume", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_progressive_schedule_runs_each_stage(teacher_dir, data_files, tmp_path):
    cfg = config(teacher_dir, data_files, tmp_path / "prog", schedule="0.5,0", tokens=2 * 2 * 64)
    metrics = distill(cfg)
    assert [s["attn_layers"] for s in metrics["stages"]] == [[1], []]
    stage_dirs = sorted(p.name for p in (tmp_path / "prog" / "stages").iterdir())
    assert len(stage_dirs) == 2
    final = json.loads((tmp_path / "prog" / "model" / "config.json").read_text())
    assert final["attn_layers"] == []


def test_plan_stages():
    assert [s.attn_layers for s in plan_stages(8, 0.5, "0.5,0.25,0.125")] == [[1, 3, 5, 7], [3, 7], [7]]
    assert [s.attn_layers for s in plan_stages(8, 0.5, "stepwise:0.25")] == [[1, 3, 5, 7], [3, 5, 7], [3, 7]]
    with pytest.raises(ValueError, match="only convert more layers"):
        plan_stages(8, 0.25, "0.5")


def test_packed_loss_equals_documents_one_by_one():
    torch.manual_seed(0)
    docs = [{"input_ids": torch.randint(0, 50, (n,)).tolist(), "loss_mask": [0] + [1] * (n - 1)} for n in (7, 5, 9)]
    rows = pack_documents(docs, seq_len=32)
    assert len(rows) == 1
    batch = collate(rows)
    table = torch.randn(50, 50, dtype=torch.float64)  # a "model": logits depend on the token only
    teacher_table = torch.randn(50, 50, dtype=torch.float64)
    packed = distill_loss(table[batch["input_ids"]], teacher_table[batch["input_ids"]], batch["input_ids"],
                          batch["loss_mask"], kl_weight=0.1, ce_weight=1.0)
    total, count = 0.0, 0
    for d in docs:
        ids = torch.tensor([d["input_ids"]])
        out = distill_loss(table[ids], teacher_table[ids], ids, torch.tensor([d["loss_mask"]]),
                           kl_weight=0.1, ce_weight=1.0)
        total += float(out["loss"]) * out["n_tokens"]
        count += out["n_tokens"]
    assert packed["n_tokens"] == count
    assert abs(float(packed["loss"]) - total / count) < 1e-6  # the loss accumulates in float32


def test_cli_distill_errors_are_one_line(teacher_dir, data_files, tmp_path, capsys):
    chats, _ = data_files
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    assert cli_main(["distill", "--teacher", str(teacher_dir), "--data", str(chats), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]
    assert (out / "something").read_text() == "x"
    assert cli_main(["distill", "--teacher", str(teacher_dir), "--data", str(tmp_path / "missing.jsonl"),
                     "--out", str(tmp_path / "new")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert cli_main(["distill", "--stage", "stage7", "--out", str(tmp_path / "x")]) == 2
    assert "stage1" in capsys.readouterr().err
    # settings that would run out of memory are refused before anything else happens
    code = cli_main(["distill", "--teacher", str(teacher_dir), "--data", str(chats), "--out", str(tmp_path / "oom"),
                     "--batch-size", "100000", "--seq-len", "65536"])
    assert code == 2 and "lower --batch-size" in capsys.readouterr().err
    assert not (tmp_path / "oom").exists()
    # attention settings the teacher cannot take are refused before the run directory is claimed:
    # a fraction out of range before the teacher loads, a layer it lacks once its depth is known
    for attention, schedule, message in (("1.5", None, "must be in [0, 1]"), ("0.5", "0.5,1.25", "got 1.25"),
                                         ("0,99", None, "out of range")):
        flags = ["--attention", attention] + (["--schedule", schedule] if schedule else [])
        assert cli_main(["distill", "--teacher", str(teacher_dir), "--data", str(chats), "--out",
                         str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        distill(config(teacher_dir, data_files, tmp_path / "e", data=str(empty)))


def test_a_time_budget_without_a_token_count_trains_for_the_budget(tmp_path):
    from mambaify.distill.trainer import TOKENS_UNTIL_THE_BUDGET
    from mambaify.draft import DraftConfig

    default = DistillConfig().tokens
    assert DistillConfig.from_flags(None, {"tokens": None, "time_budget_s": None}).tokens == default
    assert DistillConfig.from_flags(None, {"time_budget_s": 60.0}).tokens == TOKENS_UNTIL_THE_BUDGET
    assert DistillConfig.from_flags(None, {"time_budget_s": 60.0, "tokens": 4096}).tokens == 4096  # a cap
    assert DraftConfig.from_flags(None, {"time_budget_s": 60.0}).tokens == TOKENS_UNTIL_THE_BUDGET
    with_tokens, without = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with_tokens.write_text("tokens: 8192\ntime_budget_s: 30\n")
    without.write_text("time_budget_s: 30\nseq_len: 64\n")
    assert DistillConfig.from_flags(with_tokens, {}).tokens == 8192
    assert DistillConfig.from_flags(without, {}).tokens == TOKENS_UNTIL_THE_BUDGET
    assert DistillConfig.from_flags(without, {"tokens": 512}).tokens == 512
    assert DistillConfig.from_flags(without, {}).seq_len == 64


def test_a_stage_that_would_pass_over_its_data_many_times_says_so(teacher_dir, data_files, tmp_path, caplog):
    from mambaify.distill.trainer import MAX_DATA_PASSES, repetition_warning

    assert repetition_warning(10, 1000, rows=5, seq_len=500) is None  # 10 k tokens over 2.5 k: 4 passes
    warning = repetition_warning(11, 1000, rows=5, seq_len=500)
    assert "4 passes" in warning and "--text-docs" in warning and "--data" in warning
    assert MAX_DATA_PASSES == 4.0
    # A run asking for far more tokens than its data holds warns before it trains (stopped after
    # one step here); one within its data does not.
    with caplog.at_level("WARNING", logger="mambaify.distill.trainer"), pytest.raises(RunInterrupted):
        distill(config(teacher_dir, data_files, tmp_path / "long", tokens=10**7), stop_after_steps=1)
    assert "passes), so the model will mostly memorise them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mambaify.distill.trainer"), pytest.raises(RunInterrupted):
        distill(config(teacher_dir, data_files, tmp_path / "short"), stop_after_steps=1)
    assert "memorise" not in caplog.text


def test_data_volume_flags_reach_the_configs():
    from mambaify.cli import build_parser
    from mambaify.draft import DraftConfig

    parser = build_parser()
    flags = ["--text-docs", "5000", "--num-prompts", "2000", "--label-tokens", "96", "--label-batch-size", "256",
             "--eval-texts", "128", "--eval-chats", "48"]
    fields = ("text_docs", "num_prompts", "label_tokens", "label_batch_size", "eval_texts", "eval_chats")
    from mambaify.distill.flags import switch_values

    for command, cls in (("distill", DistillConfig), ("distill-draft", DraftConfig)):
        args = parser.parse_args([command, *flags])
        cfg = cls.from_flags(None, {f: getattr(args, f) for f in fields})
        assert [getattr(cfg, f) for f in fields] == [5000, 2000, 96, 256, 128, 48], command
        # The shared switches: off unless given.
        assert switch_values(args) == {} and cls.from_flags(None, {}).compile is False
        switched = parser.parse_args([command, "--compile", "--no-progress"])
        cfg = cls.from_flags(None, switch_values(switched))
        assert (cfg.compile, cfg.progress) == (True, False), command


def test_compiled_training_steps_follow_the_eager_ones(teacher_dir, data_files, tmp_path, monkeypatch):
    """--compile runs the student's and the teacher's forward through torch.compile (inductor on
    the CPU here); the steps compute what the eager ones do, up to float32 rounding."""
    from mambaify.distill import trainer

    made = []
    real = trainer.compiled
    monkeypatch.setattr(trainer, "compiled", lambda model: made.append(type(model).__name__) or real(model))
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        distill(config(teacher_dir, data_files, tmp_path / name, tokens=2 * 2 * 64, eval_texts=2, compile=flag))
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [json.loads(line)["loss"] for line in records], weights(tmp_path / name)
    assert made == ["HybridForCausalLM", "LlamaForCausalLM"]  # the student, then the teacher
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == len(compiled_losses) == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-4, atol=1e-5)


def test_resume_may_switch_how_steps_run_but_not_what_they_compute(tmp_path):
    import yaml

    from mambaify.distill.trainer import _check_run_dir

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    saved = DistillConfig(out=str(run)).to_dict()
    del saved["compile"]  # a run saved before the option existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 2}))
    for switches in ({"compile": True}, {"compile": False, "progress": False, "save_every": 7}):
        assert _check_run_dir(run, DistillConfig(out=str(run), **switches), resume=True) == {"step": 2}
    with pytest.raises(ValueError, match="different options.*seq_len"):
        _check_run_dir(run, DistillConfig(out=str(run), seq_len=128), resume=True)



def test_resume_takes_the_options_the_run_was_started_with(tmp_path):
    """--resume: the run's saved options under the YAML file and the flags given; without
    --resume, or before a run saved any, only those."""
    import yaml

    from mambaify.draft import DraftConfig

    for cls in (DistillConfig, DraftConfig):
        run = tmp_path / cls.__name__
        assert cls.from_flags(None, {"out": str(run)}, resume=True) == cls(out=str(run))  # nothing saved yet
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cls(out=str(run), lr=0.01, seq_len=64).to_dict()))
        resumed = cls.from_flags(None, {"out": str(run), "save_every": 5, "lr": None}, resume=True)
        assert (resumed.lr, resumed.seq_len, resumed.save_every) == (0.01, 64, 5)
        given = tmp_path / "given.yaml"
        given.write_text(yaml.safe_dump({"seq_len": 128}))
        assert cls.from_flags(given, {"out": str(run)}, resume=True).seq_len == 128  # then refused as a change
        assert cls.from_flags(None, {"out": str(run)}) == cls(out=str(run))


def test_device_option_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda, got 'gpu'"):
        DistillConfig(out=str(tmp_path / "run"), device="gpu").validate()
    cuda = DistillConfig(out=str(tmp_path / "run"), device="cuda")
    if torch.cuda.is_available():
        cuda.validate()
    else:
        with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA GPU"):
            cuda.validate()
    assert not (tmp_path / "run").exists()


def test_memory_check_counts_the_students_shards_under_fsdp(tmp_path, monkeypatch):
    import types

    import psutil

    from mambaify.distill.trainer import check_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=16 * 2**30))
    shape = types.SimpleNamespace(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, vocab_size=32000)
    cfg = DistillConfig(out=str(tmp_path / "run"), batch_size=1, seq_len=256)
    # 1.2 B parameters: 16 bytes each for the float32 student with gradients and Adam moments, 4 for the teacher.
    with pytest.raises(ValueError, match=r"needs about 23\.3 GiB.*FSDP shards the student"):
        check_memory(cfg, shape, torch.device("cpu"), bf16=False)
    check_memory(cfg, shape, torch.device("cpu"), bf16=False, shards=8)  # 2 bytes a parameter each, plus the teacher
