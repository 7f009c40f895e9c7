"""Programmatic dependent launch (PDL) for the kernels of a decode step (Hopper on).

Launched one after another, each kernel of a step waits for the one ahead to finish and flush
before its programs even start, then ramps up from nothing: at batch 1 the 8B step's
matrix-vector products read their weights at 3.1-3.4 TB/s against the 4.3-4.5 TB/s of the 1 GB
LM head (BENCHMARKS.md, session 7). With PDL a kernel is launched early: its programs may start
while the kernel ahead finishes, do what does not depend on it (the GEMV reads its first weight
tiles), then wait for it (``griddepcontrol.wait``) before reading its inputs or writing anything,
and let the next kernel launch in turn. MAMBAIFY_PDL=1 turns it on (:func:`mambaify.ops.pdl_requested`);
inductor's kernels follow through its ``triton.enable_pdl`` (the engines' compile step). Off by
default: measured slower on the H200 (the 8B 0% hybrid's batch-1 step 5.07 ms with it against
4.46 without, session 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import pdl_enabled


def launch_options(device: torch.device) -> dict:
    """A kernel's PDL arguments: the ``PDL`` constexpr, and Triton's ``launch_pdl`` when on
    (:func:`mambaify.ops.pdl_enabled`)."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the kernel ahead has finished (its outputs may be this kernel's
    inputs, and it may still read what this kernel writes), then let the next kernel launch.
    A kernel calls this before its first load or store of anything another kernel touches."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
