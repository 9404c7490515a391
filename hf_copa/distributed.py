"""Which device family Accelerate should use, so that CPU-only runs can also be multi-process.

Accelerate's `PartialState` treats a `torchrun` launch as multi-process only for an accelerator unless it
is told `cpu=True`; `accelerate launch --cpu` sets `ACCELERATE_USE_CPU`, plain `torchrun` sets nothing.
"""

from __future__ import annotations

import os

import torch


def use_cpu() -> bool:
    """True when asked for (`ACCELERATE_USE_CPU`) or when several processes run without CUDA."""
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not torch.cuda.is_available())


def end_processes(succeeded: bool) -> None:
    """Close the process group of a `torchrun` launch before the interpreter exits.

    Left to the interpreter's teardown, a rank that finished first can destroy gloo's threads while they
    are still joinable and abort ("terminate called without an active exception"; pytorch/pytorch issue
    190489, and PR 179291 on gloo's work objects at interpreter finalization). After a success the
    ranks first wait for one another; after an error they do not, since the others may never arrive.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()
