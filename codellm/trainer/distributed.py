"""Data-parallel training under ``torchrun`` or ``accelerate launch``: both start one process per GPU
with RANK / WORLD_SIZE / LOCAL_RANK set; without them this is a world of one and nothing changes.

Every rank holds the whole (4-bit) base and its own LoRA copy; DistributedDataParallel averages the
adapter gradients. Rank 0 alone writes metrics, checkpoints and the registry entry."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """``value`` summed over ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def rng_state(self) -> dict:
        """This process's random state (CPU and its GPU): what dropout draws next."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def set_rng_state(self, saved) -> None:
        """Restore this rank's state from a checkpoint's per-rank list (older checkpoints: one CPU state)."""
        if isinstance(saved, torch.Tensor):
            torch.set_rng_state(saved)
            return
        state = saved[self.rank] if len(saved) == self.size else saved[0]
        torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None) -> World:
    """The world this process is part of; joins the process group when launched by torchrun/accelerate."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, dev)
