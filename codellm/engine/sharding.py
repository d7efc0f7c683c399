"""Tensor parallelism: each of N processes holds 1/N of every layer's attention heads and MLP columns.

Megatron's split of a decoder layer. q/k/v and gate/up are cut by output rows (column-parallel: a rank computes its
own heads and its own slice of the intermediate activations); o and down by input columns (row-parallel: each rank's
partial product is summed over the ranks by one all-reduce). That is two all-reduces a layer. Embeddings, norms and
the LM head stay whole on every rank, so every rank ends a forward pass with the same logits. Heads are cut in
contiguous runs, so a rank's query heads use exactly its own KV heads (grouped-query attention keeps its groups),
and each rank's paged cache holds 1/N of the keys and values.

``plan`` checks that a model divides (pure); ``shard`` cuts a loaded transformers model in place, before the engine
fuses its projections. The all-reduce runs over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import logging

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

COLUMNS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # cut by output: heads, intermediate columns
ROWS = ("o_proj", "down_proj")  # cut by input: partial sums, all-reduced


class Plan(msgspec.Struct, frozen=True):
    """What each of ``world`` ranks holds of every layer."""

    world: int
    heads: int  # query heads a rank
    kv_heads: int  # key/value heads a rank
    head_dim: int
    intermediate: int  # MLP columns a rank


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def plan(config, world: int) -> Plan:
    """The split of a model with this config over ``world`` ranks; ValueError where it does not divide evenly."""
    cfg = _text_config(config)
    heads, hidden, inter = cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    if world < 1:
        raise ValueError("tensor parallelism needs at least one rank")
    for what, n in (("attention heads", heads), ("key/value heads", kv), ("MLP columns", inter)):
        if n % world:
            raise ValueError(f"{n} {what} do not divide over {world} ranks")
    return Plan(world, heads // world, kv // world, head_dim, inter // world)


class RowParallelLinear(nn.Linear):
    """A linear layer holding a slice of its input columns: the partial products of all ranks are summed (one
    all-reduce), then the bias is added once."""

    def __init__(self, layer: nn.Linear, rank: int, world: int, group=None):
        cols = layer.in_features // world
        super().__init__(cols, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight = nn.Parameter(layer.weight.data[:, rank * cols:(rank + 1) * cols].contiguous(),
                                   requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _columns(layer: nn.Linear, rank: int, world: int) -> None:
    """Keep rank ``rank``'s contiguous slice of the output rows (and bias)."""
    rows = layer.out_features // world
    layer.weight = nn.Parameter(layer.weight.data[rank * rows:(rank + 1) * rows].contiguous(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[rank * rows:(rank + 1) * rows].contiguous(), requires_grad=False)
    layer.out_features = rows


def shard(model: nn.Module, rank: int, world: int, group=None) -> Plan:
    """Cut ``model`` (a decoder of q/k/v/o attention and a gated MLP: Llama, Qwen2, Mistral) in place to rank
    ``rank``'s share; its config then describes the share (so the KV cache is sized for it)."""
    cfg = _text_config(model)
    split = plan(cfg, world)
    layers = [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "o_proj"))]
    mlps = [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "down_proj"))]
    if len(layers) != cfg.num_hidden_layers or len(mlps) != cfg.num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: not a decoder of q/k/v/o attention and gated MLPs")
    if world == 1:
        return split
    with torch.no_grad():
        for module in layers + mlps:
            for name in COLUMNS:
                if hasattr(module, name):
                    _columns(getattr(module, name), rank, world)
            for name in ROWS:
                if hasattr(module, name):
                    setattr(module, name, RowParallelLinear(getattr(module, name), rank, world, group))
    cfg.head_dim = split.head_dim  # (not derived from the hidden size and the heads left any more)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = split.heads, split.kv_heads, split.intermediate
    model._codellm_shard = (rank, world)
    return split


# -- serving over several ranks ---------------------------------------------------------------------------------
# Rank 0 runs the engine: the scheduler, the paged cache's bookkeeping and sampling. Every forward it launches is
# first broadcast to the other ranks (``Ranks.relay``), which run the same forward on their shards, so that the
# all-reduces inside meet. What crosses is typed (msgspec) and tensors go as raw bytes: no pickles.
class Array(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, t: torch.Tensor) -> "Array":
        t = t.detach().cpu().contiguous()
        return cls(str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()
                   if t.numel() else b"")

    def tensor(self, device) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype, device=device)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).view(self.shape).to(device)


class Setup(msgspec.Struct, tag="setup", array_like=True):
    blocks: int  # the paged cache's blocks (the same on every rank: rank 0 sizes it)
    block_size: int
    rows: int
    max_len: int


class Forward(msgspec.Struct, tag="forward", array_like=True):
    ids: Array
    positions: Array
    keep: int | Array  # logits_to_keep
    tensors: dict[str, Array]  # the step context's tensors (write, positions, mask, kv_index, table, cu, cu_k)
    kv_len: int
    max_k: int


class Done(msgspec.Struct, tag="done", array_like=True):
    pass


Message = Setup | Forward | Done
_CONTEXT = ("write", "positions", "mask", "kv_index", "table", "cu", "cu_k")


def _send(message: msgspec.Struct, group=None) -> None:
    import torch.distributed as dist

    data = msgspec.msgpack.encode(message)
    dist.broadcast(torch.tensor([len(data)], dtype=torch.long), 0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=group)


def _receive(decoder, group=None):
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, 0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group)
    return decoder.decode(data.numpy().tobytes())


class Ranks:
    """Rank 0's view of the others: started with the engine's process, given every forward, stopped with it."""

    def __init__(self, world: int, processes: list, control=None):
        self.world, self.processes = world, processes
        self.control = control  # the group messages go over (gloo: NCCL moves only GPU tensors)

    @classmethod
    def start(cls, world: int, worker_args: tuple, init: str, backend: str) -> "Ranks":
        """Start ranks 1..world-1 (``worker`` with ``worker_args``), then join the process group as rank 0. The ranks
        are interpreters of their own (an engine process, a daemon, may not fork children of its own), and each
        is killed when this process dies. A rank loads its weights before it joins, so one that fails (a missing
        file, no memory) exits before the group forms, and this fails at once instead of waiting out the group's
        timeout."""
        import json
        import subprocess
        import sys
        import threading
        from datetime import timedelta

        import torch.distributed as dist

        processes = [subprocess.Popen([sys.executable, "-m", "codellm.engine.sharding",
                                       json.dumps([rank, world, init, backend, *worker_args])],
                                      preexec_fn=_die_with_parent) for rank in range(1, world)]
        joined, outcome = threading.Event(), []

        def join() -> None:  # (blocks until every rank has joined)
            try:
                dist.init_process_group(backend, init_method=init, rank=0, world_size=world,
                                        timeout=timedelta(minutes=5))
                outcome.append(_control_group(backend))
            except BaseException as exc:
                outcome.append(exc)
            finally:
                joined.set()

        threading.Thread(target=join, name="tp-join", daemon=True).start()
        try:
            while not joined.wait(0.2):
                dead = [(rank, p.returncode) for rank, p in enumerate(processes, 1) if p.poll() is not None]
                if dead:
                    raise RuntimeError("tensor parallelism: " + ", ".join(
                        f"rank {rank} exited (code {code})" for rank, code in dead) + " before joining; see its log")
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
        except BaseException:
            for p in processes:
                p.kill()
            raise
        return cls(world, processes, outcome[0])

    def setup(self, cache) -> None:
        _send(Setup(cache.blocks, cache.block_size, cache.slots, cache.max_len), self.control)

    def relay(self, ctx, ids: torch.Tensor, positions: torch.Tensor, keep) -> None:
        tensors = {name: Array.of(getattr(ctx, name)) for name in _CONTEXT if getattr(ctx, name) is not None}
        _send(Forward(Array.of(ids), Array.of(positions), keep if isinstance(keep, int) else Array.of(keep), tensors,
                      ctx.kv_len, ctx.max_k), self.control)

    def stop(self) -> None:
        import torch.distributed as dist

        try:
            _send(Done(), self.control)
            dist.destroy_process_group()
        except Exception:  # a rank already gone: nothing to tell it
            pass
        for p in self.processes:
            try:
                p.wait(15)
            except Exception:
                p.kill()


def _control_group(backend: str):
    """The group that carries messages (CPU tensors): the default one on gloo, a gloo one beside NCCL. Every rank
    makes it, in the same order."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo") if backend != "gloo" else None


def _die_with_parent() -> None:
    """(In a rank, before it starts) a SIGTERM when rank 0 exits, where Linux offers it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker(rank: int, world: int, init: str, backend: str, home: str, read_only: bool, name: str, load: dict) -> None:
    """Rank ``rank``: load the same weights, keep its shard, and run every forward rank 0 relays until told to stop."""
    from datetime import timedelta

    import torch.distributed as dist

    from codellm.engine import fusion, kvcache, loader
    from codellm.engine.runner import kv_shape
    from codellm.registry import Registry

    torch.set_grad_enabled(False)
    registry = Registry(home, read_only=read_only)  # what may fail comes before joining (see ``Ranks.start``)
    entry, weights = loader.resolve(registry, name)
    if backend == "nccl":  # a GPU a rank
        load = {**load, "device": f"cuda:{rank}"}
        torch.cuda.set_device(rank)
    model, dev, dtype = loader.load_weights(registry, entry, weights, **load)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    control = _control_group(backend)
    shard(model, rank, world)
    fusion.fuse(model)  # as rank 0's engine does: the same kernels in the same order
    decoder = msgspec.msgpack.Decoder(Message)
    setup = _receive(decoder, control)
    layers, kv_heads, head_dim = kv_shape(model)
    cache = kvcache.PagedCache(layers=layers, blocks=setup.blocks, block_size=setup.block_size, rows=setup.rows,
                               kv_heads=kv_heads, head_dim=head_dim, max_len=setup.max_len, dtype=dtype, device=dev)
    while True:
        message = _receive(decoder, control)
        if isinstance(message, Done):
            break
        parts = {k: a.tensor(dev) for k, a in message.tensors.items()}
        ctx = kvcache.StepContext(cache, parts["write"], parts["positions"], message.kv_len, parts.get("mask"),
                                  parts.get("kv_index"), table=parts.get("table"), cu=parts.get("cu"),
                                  cu_k=parts.get("cu_k"), max_k=message.max_k)
        keep = message.keep if isinstance(message.keep, int) else message.keep.tensor(dev)
        with kvcache.use(ctx), kvcache.attention_backends(dev), torch.inference_mode():
            model(input_ids=message.ids.tensor(dev), position_ids=message.positions.tensor(dev), use_cache=False,
                  logits_to_keep=keep)
    dist.destroy_process_group()


if __name__ == "__main__":  # a rank, as ``Ranks.start`` runs it
    import json
    import sys

    from codellm import logs

    logs.configure(logging.INFO)
    worker(*json.loads(sys.argv[1]))
