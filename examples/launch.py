"""What every distributed example does first under ``torchrun``: one process group per job."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def start_process_group(script: str) -> torch.device:
    """This rank's device, with the process group started on it: NCCL on a GPU (one per local
    rank), gloo on the CPU. Outside torchrun, exits saying how to launch ``script``."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"run me through torchrun: torchrun --nproc_per_node 2 examples/{script}")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")
