"""Several processes through torchrun: two CPU processes give the same student as one process
accumulating the same two micro-batches (gradients are averaged per token, not per process),
with data parallelism and with the student sharded by FSDP2, whose runs also resume; a launch
whose processes do not join one group is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mambaify import convert
from mambaify.teachers import load_teacher
from tests.test_trainer import config


def test_two_processes_equal_one_process_with_accumulation(tmp_path, teacher_dir, data_files):
    cfg = config(teacher_dir, data_files, tmp_path / "unused", tokens=4 * 2 * 64)
    options = cfg.to_dict()
    options.pop("out")
    if not torch.cuda.is_available():
        # The device left at "auto": without a GPU the processes must still find each other
        # (they used to run as two separate runs writing one directory).
        options.pop("device")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(options))
    common = ["distill", "--config", str(tmp_path / "run.yaml"), "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mambaify.cli"]
    subprocess.run(torchrun + common + ["--out", str(tmp_path / "ddp")], check=True, timeout=600,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "mambaify.cli"] + common + ["--out", str(tmp_path / "single"),
                   "--grad-accum", "2"], check=True, timeout=600, capture_output=True)
    ddp = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert ddp.keys() == single.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6)
    converted = convert(load_teacher(str(teacher_dir))[0], attention=0.5).state_dict()
    assert any(not torch.equal(converted[n], ddp[n]) for n in ddp)  # training did move the weights


def test_a_launch_whose_processes_stay_apart_is_refused(monkeypatch, tmp_path):
    import pytest

    from mambaify.distill import trainer

    class OnItsOwn:  # what accelerate hands each launched process when it sets up no group
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(trainer, "Accelerator", OnItsOwn)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched .* accelerate joined 1"):
        trainer.make_accelerator(trainer.DistillConfig(out=str(tmp_path / "run")))



def test_fsdp_shards_give_the_same_student_through_a_schedule_and_resume(tmp_path, teacher_dir, data_files):
    # Two stages (50% then 0% attention): the second starts from the first's gathered weights.
    cfg = config(teacher_dir, data_files, tmp_path / "unused", tokens=8 * 2 * 64, schedule="0.5,0")
    options = cfg.to_dict()
    for key in ("out", "device"):
        options.pop(key)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(options))
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__).with_name("_fsdp_on_cpu.py"))]

    def launch(command, out, *extra, stop_after=None):
        env = {**os.environ, "STOP_AFTER_STEPS": str(stop_after or "")}
        return subprocess.run(command + ["distill", "--config", str(tmp_path / "run.yaml"), "--no-progress",
                                         "--out", str(tmp_path / out), *extra],
                              timeout=600, capture_output=True, text=True, env=env)

    for done in (launch(fsdp, "fsdp"), launch([sys.executable, "-m", "mambaify.cli"], "single", "--grad-accum", "2")):
        assert done.returncode == 0, done.stderr[-4000:]
    sharded, single = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("fsdp", "single"))
    assert sharded.keys() == single.keys()
    for name in sharded:  # eight steps of float32 sums in another order; a step moves weights by ~1e-3
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=1e-5)
    for stage in ("0-attn50pct-1of2", "1-attn0pct-0of2"):
        assert (tmp_path / "fsdp" / "stages" / stage / "model.safetensors").is_file()
    steps = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 8 and all(r["grad_norm"] > 0 for r in steps)  # clipping saw the sharded gradients

    # Killed after step 3 of stage 0 (its checkpoint is from step 2), then resumed, still sharded.
    assert launch(fsdp, "resumed", stop_after=3).returncode != 0
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 2
    done = launch(fsdp, "resumed", "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for name in sharded:
        torch.testing.assert_close(resumed[name], sharded[name], rtol=1e-6, atol=1e-7)
