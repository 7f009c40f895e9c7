"""What the Triton kernel tests share: the flags that pick where a case runs, the subprocess
that runs the ``interp`` cases under TRITON_INTERPRET=1, and the kernel module a case gets."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

def run_interpreter_cases(test_file: str, select: str, timeout: int) -> str:
    """Run the cases of ``test_file`` matching ``-k select`` in a fresh interpreter with
    TRITON_INTERPRET=1 (it must be set before triton is imported); assert they passed and
    return pytest's output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select, test_file]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
    return proc.stdout


def kernel_module(request, module: str):
    """``module``, compiled for CUDA or, in the subprocess, interpreted; skips a case whose
    device does not run here."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device", "cuda") if callspec is not None else "cuda"
    if device == "cpu" and HAS_CUDA:
        pytest.skip("with CUDA present the kernels are compiled for it, not interpreted")
    if device == "cpu" and not INTERPRET:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_triton_interpreter")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return importlib.import_module(module)
