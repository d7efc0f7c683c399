"""Data-parallel training under ``torchrun`` or ``accelerate launch``: both start one process per GPU
with RANK / WORLD_SIZE / LOCAL_RANK set; without them this is a world of one and nothing changes.

By default every rank holds the whole (4-bit) base and its own LoRA copy, and DistributedDataParallel
averages the adapter gradients. Sharded (``shard``, FSDP2's ``fully_shard`` per decoder layer), each rank
holds 1/N of the 16-bit base and of the adapter: a model too large for one GPU trains over several, each
layer gathered for its forward and backward only. Forwards are then collective: every rank evaluates too,
and adapter and optimizer states are gathered before rank 0 writes them. Rank 0 alone writes metrics,
checkpoints and the registry entry."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    shard: bool = False  # FSDP: parameters sharded over the ranks (else each holds the whole model: DDP)

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

    def prepare(self, root: torch.nn.Module, layers: list[torch.nn.Module]) -> torch.nn.Module:
        """``root`` (the loss module) sharded onto this rank's device, a group per decoder layer and one for the
        rest: 16-bit weights gathered for compute, gradients reduced in fp32 into fp32 shards of the adapter. Rank 0
        holds the whole model on its CPU, the others the same model on the meta device: each rank receives its own
        shards from rank 0, so host memory holds the weights once, not once per rank. Unsharded: as it is."""
        if not self.shard:
            return root
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.size,))
        low = torch.bfloat16 if self.device.type == "cuda" else None
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
        for p in root.parameters():  # fp32 masters for what trains (FSDP wants one dtype of them per group)
            if p.requires_grad:
                p.data = p.data.float()
        whole = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True)) if self.main else {}
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(root, mesh=mesh, mp_policy=policy)
        for module in root.modules():  # buffers (rotary frequencies: not in a state dict) come whole from rank 0
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[name] = (torch.empty_like(buf, device=self.device) if buf.is_meta
                                             else buf.to(self.device))
        for buf in root.buffers():
            dist.broadcast(buf, 0)
        set_model_state_dict(root, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return root

    @contextlib.contextmanager
    def gathered(self, root: torch.nn.Module):
        """Sharded: the root group's weights (embeddings, final norm, output layer) gathered whole while the model
        is called other than through ``root`` (generation); each layer still gathers its own."""
        if not self.shard:
            yield
            return
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.size == 1 or self.shard:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def accumulating(self, runner: torch.nn.Module, sync: bool):
        """The context of a micro-batch's backward: gradients are reduced over the ranks only when ``sync``
        (the window's last micro-batch); the others accumulate locally."""
        if self.size == 1:
            return contextlib.nullcontext()
        if self.shard:
            runner.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else runner.no_sync()

    def adapter_state(self, model: torch.nn.Module) -> dict | None:
        """Sharded: the trained parameters gathered whole, on rank 0's CPU (None elsewhere); every rank calls
        it. Unsharded: None, the model's own parameters are whole."""
        if not self.shard:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
        return state if self.main else None

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        """The optimizer's state to checkpoint (sharded: gathered whole, by parameter name; every rank calls it)."""
        if not self.shard:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        if not self.shard:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None, shard: bool = False) -> World:
    """The world this process is part of; joins the process group when launched by torchrun/accelerate.
    ``shard``: FSDP over the ranks (a world of one has nothing to shard)."""
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
    return World(rank, size, dev, shard)
