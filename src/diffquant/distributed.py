"""Runs under ``accelerate launch --num_processes N``: one process per GPU (NCCL), or gloo between CPU processes.

Library code calls these helpers unconditionally: without an initialised process group (a plain
``python`` run, or one process) every one of them is a no-op, so single-process results never change.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist


def launch_state(device: str):
    """Accelerate's ``PartialState`` when this process is one of several started by ``accelerate launch``, else None.

    Creating it joins the process group; ``device="cpu"`` makes the processes talk over gloo, otherwise
    each process takes its own GPU (``state.device``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()


@torch.no_grad()
def all_reduce_sum(tensors: list[torch.Tensor], bucket: int = 1 << 24) -> None:
    """Sum each tensor over all processes, in place; tensors travel flattened in buckets of up to ``bucket`` elements."""
    if rank_and_size()[1] == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        start = 0
        while start < len(group):
            end, size = start, 0
            while end < len(group) and (end == start or size + group[end].numel() <= bucket):
                size += group[end].numel()
                end += 1
            flat = torch.cat([t.reshape(-1) for t in group[start:end]])
            dist.all_reduce(flat)
            offset = 0
            for t in group[start:end]:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            start = end


@torch.no_grad()
def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor with the main process's values, in place."""
    if rank_and_size()[1] == 1:
        return
    for t in tensors:
        dist.broadcast(t, 0)


def check_same_everywhere(tensors: list[torch.Tensor], what: str) -> None:
    """Raise if the tensors' bytes differ between processes (compares a hash, not the tensors)."""
    rank, size = rank_and_size()
    if size == 1:
        return
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=tensors[0].device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine)
    if any(not torch.equal(every[0], other) for other in every[1:]):
        raise RuntimeError(f"{what} differ between the {size} processes; they must run the same code on the same data")
