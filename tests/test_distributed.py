"""Data parallelism through torchrun: two CPU processes give the same student as one process
accumulating the same two micro-batches (gradients are averaged per token, not per process);
a launch whose processes do not join one group is refused."""

import subprocess
import sys

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
