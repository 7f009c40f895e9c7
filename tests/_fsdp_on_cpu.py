"""``python -m torch.distributed.run ... tests/_fsdp_on_cpu.py distill ...``: mambaify's command line
with accelerate's FSDP2 on CPU processes (gloo).

accelerate offers FSDP only on GPUs; its FSDP2 code itself runs on CPU tensors, so the
Accelerator is switched to FSDP after it is made. With ``STOP_AFTER_STEPS=N`` the run stops after N
optimizer steps, as a kill would (the checkpoint written before then is what a resume finds).
"""

import functools
import os
import sys

from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
from accelerate.state import PartialState

from mambaify.cli import main
from mambaify.distill import trainer


def fsdp_accelerator(**kwargs):
    accelerator = Accelerator(**kwargs)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["HybridDecoderLayer"],
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True)
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return accelerator


trainer.Accelerator = fsdp_accelerator
if os.environ.get("STOP_AFTER_STEPS"):
    trainer.distill = functools.partial(trainer.distill, stop_after_steps=int(os.environ["STOP_AFTER_STEPS"]))
sys.exit(main(sys.argv[1:]))
