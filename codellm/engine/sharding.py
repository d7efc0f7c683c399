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
    """A model's, or a config's, text config; a config.json read as a dict, as attributes."""
    if isinstance(model_or_config, dict):
        from types import SimpleNamespace

        return SimpleNamespace(**model_or_config)
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def plan(config, world: int) -> Plan:
    """The split of a model with this config over ``world`` ranks; ValueError where it does not divide evenly."""
    cfg = _text_config(config)  # (a transformers config, or the config.json's dict)
    heads, hidden, inter = (getattr(cfg, k, None) for k in ("num_attention_heads", "hidden_size", "intermediate_size"))
    if not (heads and hidden and inter):
        raise ValueError("tensor parallelism splits decoders whose config gives their heads, hidden and MLP sizes")
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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _part(tensor, span: tuple[int, int, int]):
    """The ``(dim, start, stop)`` slice of a tensor, or of a safetensors file's tensor (read as that slice only)."""
    dim, start, stop = span
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def _projections(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(module name, module, attribute, dim) of every projection tensor parallelism cuts: dim 0 by output rows
    (column-parallel), 1 by input columns (row-parallel). ValueError unless the model is a decoder of q/k/v/o
    attention and gated MLPs (Llama, Qwen2, Mistral)."""
    cfg = _text_config(model)
    found, attention, mlps = [], 0, 0
    for prefix, module in model.named_modules():
        attention += all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "o_proj"))
        mlps += all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "down_proj"))
        for names, dim in ((COLUMNS, 0), (ROWS, 1)):
            found += [(prefix, module, n, dim) for n in names if isinstance(getattr(module, n, None), nn.Linear)]
    if attention != cfg.num_hidden_layers or mlps != cfg.num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: not a decoder of q/k/v/o attention and gated MLPs")
    return found


def cuts(model: nn.Module, rank: int, world: int) -> dict[str, tuple[int, int, int]]:
    """What rank ``rank`` keeps of each tensor that is cut, by state-dict name: (dim, start, stop). Tensors not
    named here are whole on every rank."""
    out = {}
    for prefix, module, attr, dim in _projections(model):
        layer, name = getattr(module, attr), f"{prefix}.{attr}" if prefix else attr
        size = (layer.out_features if dim == 0 else layer.in_features) // world
        out[f"{name}.weight"] = (dim, rank * size, (rank + 1) * size)
        if dim == 0 and layer.bias is not None:  # (a row-parallel bias is added once, whole)
            out[f"{name}.bias"] = (0, rank * size, (rank + 1) * size)
    return out


def shard(model: nn.Module, rank: int, world: int, group=None) -> Plan:
    """Cut ``model`` in place to rank ``rank``'s share (on the meta device too: ``load`` cuts an empty model, then
    reads only its share); its config then describes the share (so the KV cache is sized for it)."""
    cfg = _text_config(model)
    split = plan(cfg, world)
    keep = cuts(model, rank, world)
    if world == 1:
        return split
    with torch.no_grad():
        for prefix, module, attr, dim in _projections(model):
            layer, name = getattr(module, attr), f"{prefix}.{attr}" if prefix else attr
            weight = _part(layer.weight.data, keep[f"{name}.weight"]).contiguous()
            bias = None if layer.bias is None else layer.bias.data
            if dim == 1:  # row-parallel: partial sums, all-reduced, and the bias whole
                setattr(module, attr, RowParallelLinear(weight, None if bias is None else bias.clone(), group))
                continue
            layer.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(_part(bias, keep[f"{name}.bias"]).contiguous(), requires_grad=False)
            layer.out_features = weight.shape[0]
    cfg.head_dim = split.head_dim  # (not derived from the hidden size and the heads left any more)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = split.heads, split.kv_heads, split.intermediate
    model._codellm_shard = (rank, world)
    return split


def load(model_dir, rank: int, world: int, *, device: torch.device, dtype: torch.dtype, **from_config) -> nn.Module:
    """Rank ``rank``'s share of the checkpoint in ``model_dir``, read slice by slice: the model is built with empty
    (meta) parameters, cut, and only then filled from the safetensors files, so that no rank ever holds, in host or
    device memory, more than its share of what is cut (a model larger than one GPU loads over several)."""
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=from_config.get("trust_remote_code", False))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **from_config)
    keep = cuts(model, rank, world)
    shard(model, rank, world)
    wanted = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in wanted:
                    continue
                piece = f.get_slice(key)
                piece = _part(piece, keep[key]) if key in keep else piece[:]
                state[key] = piece.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(f"the checkpoint in {model_dir} lacks {', '.join(empty[:4])}" + (" ..." if len(empty) > 4 else ""))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()  # (the buffers: rotary frequencies, made for real at build)


class _parameters_on_meta:
    """Parameters made inside are empty (meta): a model is built for its shapes only. Buffers are made for real:
    those not in a checkpoint (rotary frequencies) are computed at build, and small."""

    def __enter__(self):
        self._register = register = nn.Module.register_parameter

        def on_meta(module, name, param):
            register(module, name, None if param is None else
                     nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))
        nn.Module.register_parameter = on_meta
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._register


# -- serving over several ranks ---------------------------------------------------------------------------------
# Rank 0 runs the engine: the scheduler, the paged cache's bookkeeping and sampling. Every forward it launches is
# first broadcast to the other ranks as its host inputs (``Ranks.rows``, ``Ranks.packed``), from which they build the
# same step and run it on their shards, so that the all-reduces inside meet. What crosses is typed (msgspec) and
# tensors go as raw bytes: no pickles.
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


class Rows(msgspec.Struct, tag="rows", array_like=True):
    """An eager step over rows of tokens (``kvcache.step_context``): decode steps, left-padded prefills."""

    ids: Array
    positions: Array  # -1: padding
    tables: list[list[int]]  # each row's blocks


class Packed(msgspec.Struct, tag="packed", array_like=True):
    """An eager forward of packed prompt chunks (``kvcache.packed_step``)."""

    chunks: list[tuple[list[int], int, list[int]]]  # (tokens, first position, blocks)
    fresh: bool


class Done(msgspec.Struct, tag="done", array_like=True):
    pass


Message = Setup | Rows | Packed | Done


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
    def spawn(cls, world: int, worker_args: tuple, init: str, backend: str) -> "Ranks":
        """Start ranks 1..world-1 (``worker`` with ``worker_args``), each loading its share of the weights while this
        process loads its own; ``join`` then forms the group. The ranks are interpreters of their own (an engine
        process, a daemon, may not fork children of its own), and each is killed when this process dies."""
        import json
        import subprocess
        import sys

        processes = [subprocess.Popen([sys.executable, "-m", "codellm.engine.sharding",
                                       json.dumps([rank, world, init, backend, *worker_args])],
                                      preexec_fn=_die_with_parent) for rank in range(1, world)]
        ranks = cls(world, processes)
        ranks._init, ranks._backend = init, backend
        return ranks

    def join(self) -> None:
        """Join the process group as rank 0. A rank loads its weights before it joins, so one that fails (a missing
        file, no memory) exits before the group forms, and this fails at once instead of waiting out the group's
        timeout; the ranks are killed when it fails."""
        import threading
        from datetime import timedelta

        import torch.distributed as dist

        joined, outcome = threading.Event(), []

        def join() -> None:  # (blocks until every rank has joined)
            try:
                dist.init_process_group(self._backend, init_method=self._init, rank=0, world_size=self.world,
                                        timeout=timedelta(minutes=5))
                outcome.append(_control_group(self._backend))
            except BaseException as exc:
                outcome.append(exc)
            finally:
                joined.set()

        threading.Thread(target=join, name="tp-join", daemon=True).start()
        try:
            while not joined.wait(0.2):
                dead = [(rank, p.returncode) for rank, p in enumerate(self.processes, 1) if p.poll() is not None]
                if dead:
                    raise RuntimeError("tensor parallelism: " + ", ".join(
                        f"rank {rank} exited (code {code})" for rank, code in dead) + " before joining; see its log")
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
        except BaseException:
            self.kill()
            raise
        self.control = outcome[0]

    def kill(self) -> None:
        for p in self.processes:
            p.kill()

    def setup(self, cache) -> None:
        _send(Setup(cache.blocks, cache.block_size, cache.slots, cache.max_len), self.control)

    def rows(self, ids: torch.Tensor, positions: torch.Tensor, tables: list[list[int]]) -> None:
        """The other ranks run the step rank 0 is about to run, from its host inputs (nothing read back from the
        device, and a table of blocks rather than the gathered indices and masks)."""
        _send(Rows(Array.of(ids), Array.of(positions), tables), self.control)

    def packed(self, chunks: list[tuple[list[int], int, list[int]]], fresh: bool) -> None:
        _send(Packed(chunks, fresh), self.control)

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
    model, dev, dtype = loader.load_weights(registry, entry, weights, **load, shard=(rank, world))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    control = _control_group(backend)
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
        if isinstance(message, Rows):
            positions = message.positions.tensor("cpu")
            ctx = kvcache.step_context(cache, message.tables, positions)
            ids, positions = message.ids.tensor("cpu"), positions.clamp(min=0)
        else:
            ids, positions, _, ctx = kvcache.packed_step(cache, [(list(t), start, list(b)) for t, start, b in message.chunks],
                                                         message.fresh, dev)
            ids, positions = ids.view(1, -1), positions.view(1, -1)
        with kvcache.use(ctx), kvcache.attention_backends(dev), torch.inference_mode():  # (its logits are rank 0's)
            model(input_ids=ids.to(dev), position_ids=positions.to(dev), use_cache=False, logits_to_keep=1)
    dist.destroy_process_group()


if __name__ == "__main__":  # a rank, as ``Ranks.start`` runs it
    import json
    import sys

    from codellm import logs

    logs.configure(logging.INFO)
    worker(*json.loads(sys.argv[1]))
