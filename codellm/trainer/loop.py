"""LoRA / QLoRA fine-tuning of a registry model, ending as an adapter model in the registry.

On a GPU the base loads in nf4 (double quantization, bf16 compute); on CPU it is plain LoRA over fp32
weights, and says so. Loss is a mean over response tokens
across the whole accumulation window (not a mean of per-batch means). Checkpoints hold the adapter,
optimizer, scheduler, RNG and data position, so ``resume`` continues exactly where a run stopped.
A seeded slice of the data is held out: eval loss and chrF of greedy answers at each epoch's end.
Under ``torchrun`` / ``accelerate launch`` the same function trains data-parallel (``distributed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import math
import random
import time
from pathlib import Path
from typing import Callable

import msgspec
import torch

from codellm.errors import InvalidRequest
from codellm.registry import Registry
from codellm.registry import manifest as mt
from codellm.trainer import data as datamod
from codellm.trainer.prompts import IGNORE, encode


class TrainConfig(msgspec.Struct, kw_only=True):
    format: str = "auto"
    template: str = "auto"  # auto | chat | alpaca
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    max_len: int = 1024
    seed: int = 42
    save_every: int = 50
    quantize: str | None = None  # nf4 on GPU (default there); None on CPU
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None  # recompute only the first N decoder layers (None: all): speed for memory
    compile: bool = False  # torch.compile each decoder layer: norms, rotary, activations, LoRA glue fused
    optimizer: str = "adamw"  # adamw (fused on GPU) | paged_adamw_8bit (bitsandbytes; for LoRA the states are small either way)
    fsdp: bool = False  # data-parallel with the 16-bit base and the adapter sharded over the ranks (no nf4)
    packing: bool = False  # several samples per row, isolated from each other
    eval_split: float = 0.05  # fraction held out for eval loss and chrF (none when that is under one example)
    eval_data: str | None = None  # a separate eval file or hub dataset instead of a split
    eval_samples: int = 4  # eval examples answered greedily for chrF


PRESETS: dict[str, dict] = {
    # the origin projects' setups (artidoro/qlora defaults; bf16 compute where the GPU has it, not fp16)
    "llama2-7b-python-18k": dict(r=64, alpha=16, dropout=0.1, lr=2e-4, batch_size=4, max_grad_norm=0.3,
                                 warmup_ratio=0.03, epochs=1.0, template="alpaca", max_len=1024,
                                 optimizer="paged_adamw_8bit"),
    "llama3.2-1b-apps": dict(r=16, alpha=32, dropout=0.05, lr=7e-5, epochs=10.0, batch_size=4,
                             target_modules="q_proj,k_proj,v_proj,o_proj", max_len=2048, optimizer="paged_adamw_8bit"),
}


def preset(name: str, **overrides) -> "TrainConfig":
    """A TrainConfig from a named preset, with explicit settings on top."""
    if name not in PRESETS:
        raise InvalidRequest(f"unknown preset {name!r} (known: {', '.join(PRESETS)})", param="preset")
    return TrainConfig(**{**PRESETS[name], **overrides})


class Progress(msgspec.Struct):
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float


def pack(encoded: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Pack samples into rows of at most ``max_len`` tokens (first fit, longest first). Each sample keeps
    its own positions from 0, which transformers turns into a block-diagonal causal mask: packed samples
    never attend to each other, and no label crosses from one sample into the next."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for ids, labels in sorted(encoded, key=lambda x: -len(x[0])):
        labels = [IGNORE] + labels[1:]  # the first token of a sample is never predicted from the previous one
        for row in rows:
            if len(row[0]) + len(ids) <= max_len:
                row[0].extend(ids), row[1].extend(labels), row[2].extend(range(len(ids)))
                break
        else:
            rows.append((list(ids), list(labels), list(range(len(ids)))))
    return rows


def load_for_training(model_dir: Path, cfg: TrainConfig, dev: torch.device, quantize: str | None,
                      place: str = "device"):
    """The base in bf16 (GPU) / fp32 (CPU), or nf4 with double quantization and bf16 compute, with LoRA
    adapters on top. ``place``: "device" puts it on ``dev``; "cpu" leaves it on the CPU in ``dev``'s dtype (to be
    sharded); "meta" reads no weights at all and builds the same model without storage (a rank that receives its
    shards from the one that read them). Unlike peft's ``prepare_model_for_kbit_training`` nothing is upcast to
    fp32: the embedding and output layer stay 16-bit (the upcast of a 128k vocabulary costs GBs and buys nothing
    for frozen weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": dev}
    if place == "meta":
        if quantize:
            raise ValueError("a quantized base is read, not built empty")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa",
                                                     dtype=dtype)
        with contextlib.suppress(OSError):  # generation settings, as from_pretrained would read them
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kwargs)
    if not quantize and place == "device":
        model.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # (its older name is deprecated)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if cfg.checkpoint_layers is not None:  # the layers past N keep their activations instead
            for layer in _decoder_layers(model)[cfg.checkpoint_layers:]:
                layer.gradient_checkpointing = False
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(","))
    model = get_peft_model(model, lora)
    if cfg.compile:  # per layer, not the whole model: one compiled graph serves every layer (and checkpointing)
        # transformers' hub-kernel routing (the `kernels` package) sets a context variable around each attention
        # forward, and dynamo will not trace a side effect inside a checkpoint unless it may skip replaying it in
        # the recomputation: without this every layer ran eagerly. The variable is reset before the forward ends.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for layer in _decoder_layers(model):
            layer.compile()
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


OPTIMIZERS = ("adamw", "paged_adamw_8bit")


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig):
    """AdamW over the adapter weights. LoRA's optimizer state is a few hundred MB at most, so the default is
    torch's fused AdamW (one kernel per step; bitsandbytes' paged 8-bit AdamW measured 28 ms a step on an
    H100 for a 1B model's LoRA); paged 8-bit AdamW is there for the origin recipes."""
    if cfg.optimizer == "paged_adamw_8bit":
        if not params or not params[0].is_cuda:
            raise InvalidRequest("paged_adamw_8bit needs a CUDA GPU (bitsandbytes)", param="optimizer")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr)
    if cfg.optimizer != "adamw":
        raise InvalidRequest(f"unknown optimizer {cfg.optimizer!r} (use {' or '.join(OPTIMIZERS)})", param="optimizer")
    return torch.optim.AdamW(params, lr=cfg.lr, fused=bool(params) and params[0].is_cuda)


def _split(encoded: list, cfg: TrainConfig) -> tuple[list, list]:
    """(train, eval): a seeded random ``eval_split`` fraction is held out, when there are enough examples."""
    n_eval = int(len(encoded) * cfg.eval_split)
    if n_eval < 1 or len(encoded) - n_eval < 1:
        return encoded, []
    order = list(range(len(encoded)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(encoded) if i not in held], [encoded[i] for i in sorted(held)]


def train(
    registry: Registry,
    base: str,
    data_path: str | Path,
    name: str,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | None = None,
    on_progress: Callable[[Progress], None] = lambda p: None,
    status: Callable[[str], None] = lambda s: None,
):
    """Fine-tune ``base`` on ``data_path``; returns the registry entry of adapter model ``name`` (or None
    when ``stop_after`` stopped the run early, leaving a checkpoint to resume from, and on ranks other
    than 0 of a data-parallel run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from codellm.engine.loader import resolve, weights_identity
    from codellm.registry.names import ModelName
    from codellm.trainer import distributed, evaluate
    from codellm.trainer.loss import CausalLMLoss, collate, labelled_tokens

    cfg = config or TrainConfig()
    target = ModelName.parse(name)
    entry, weights = resolve(registry, base)
    if entry.manifest.is_adapter:
        raise InvalidRequest(f"{base} is an adapter: train on its base model ({entry.manifest.config.base})")
    quantize = cfg.quantize
    if quantize and cfg.fsdp:
        raise InvalidRequest("sharded training (fsdp) takes a 16-bit base, not nf4", param="quantize")
    if cfg.fsdp and cfg.optimizer != "adamw":
        raise InvalidRequest("sharded training (fsdp) steps with torch's AdamW: bitsandbytes' paged optimizer does "
                             "not take sharded parameters", param="optimizer")
    world = distributed.setup(device, shard=cfg.fsdp)
    dev = world.device
    say = status if world.main else (lambda s: None)
    workdir = registry.home / "train" / f"{target.namespace}--{target.model}--{target.tag}"
    if quantize is None:
        quantize = "nf4" if dev.type == "cuda" and not cfg.fsdp else None
    if quantize and dev.type != "cuda":
        raise InvalidRequest("nf4 (QLoRA) needs a CUDA GPU; on CPU codellm trains plain LoRA", param="quantize")
    kind = "QLoRA (nf4 base, bf16 compute)" if quantize else \
        "LoRA (bf16 base)" if dev.type == "cuda" else "LoRA (no GPU: plain LoRA on fp32 weights)"
    say(f"{kind} on {dev}" + (f", data-parallel over {world.size} processes" if world.size > 1 else "")
        + (", base and adapter sharded (FSDP)" if world.shard else ""))

    examples, fmt, data_hash = datamod.load_examples(data_path, cfg.format, say)
    model_dir = registry.files_dir(weights, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{weights_identity(weights)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = cfg.template
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) and fmt in ("chat", "alpaca") else "alpaca"

    def encode_all(exs):
        out, dropped, truncated = [], 0, 0
        for ex in exs:
            item = encode(ex, tokenizer, template, cfg.max_len)
            if item is None:
                dropped += 1
                continue
            truncated += item[2]
            out.append(item[:2])
        return out, dropped, truncated

    encoded, dropped, truncated = encode_all(examples)
    say(f"{len(encoded)} examples ({fmt}, {template} template); {truncated} truncated to {cfg.max_len} tokens, "
        f"{dropped} dropped (prompt alone too long)")
    if not encoded:
        raise InvalidRequest("no example fits in max_len", param="max_len")
    if cfg.eval_data:
        held, _, _ = encode_all(datamod.load_examples(cfg.eval_data, cfg.format, say)[0])
    else:
        encoded, held = _split(encoded, cfg)
    if held:
        say(f"{len(encoded)} train / {len(held)} eval examples (eval loss each epoch, chrF on "
            f"{min(cfg.eval_samples, len(held))} generated answers)")
    n_examples = len(encoded)
    if cfg.packing:
        encoded = pack(encoded, cfg.max_len)
        say(f"packed into {len(encoded)} rows of up to {cfg.max_len} tokens")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    last = None
    if resume:
        ckpts = sorted(workdir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            raise InvalidRequest(f"nothing to resume: no checkpoint in {workdir}")
        last = ckpts[-1]
    # sharded, rank 0 alone reads the base (on its CPU), and every rank receives only its own shard of it
    model = load_for_training(model_dir, cfg, dev, quantize,
                              place="device" if not world.shard else "cpu" if world.main else "meta")
    if last is not None and (world.main or not world.shard):  # (into the whole model, before any sharding)
        set_peft_model_state_dict(model, load_file(last / "adapter_model.safetensors"))
    loss_fn = world.prepare(CausalLMLoss(model, device=dev), _decoder_layers(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    per_epoch = math.ceil(len(encoded) / (cfg.batch_size * cfg.grad_accum * world.size))
    total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * cfg.warmup_ratio), total)

    step, position = 0, 0  # optimizer steps taken, micro-batches consumed (over all ranks)
    metrics_path = workdir / "metrics.jsonl"
    if last is not None:
        world.load_optimizer_state(model, optimizer, torch.load(last / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=True))
        state = json.loads((last / "state.json").read_text())
        step, position = state["step"], state["position"]
        world.set_rng_state(torch.load(last / "rng.pt", weights_only=True))
        if world.main:
            truncate_metrics(metrics_path, step)
        say(f"resuming at step {step} from {last.name}")
    elif world.main:
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    world.barrier()

    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)

    def micro_batch(index: int) -> list[int]:
        """The index-th micro-batch of the run: each epoch's shuffle depends only on the seed and the epoch."""
        epoch, within = divmod(index, batches_per_epoch)
        order = list(range(len(encoded)))
        random.Random(cfg.seed + epoch).shuffle(order)
        return order[within * cfg.batch_size:(within + 1) * cfg.batch_size]

    runner = world.wrap(loss_fn)  # DDP when data-parallel: the gradients sync through this module's forward
    pad = tokenizer.pad_token_id

    def log(record: dict) -> None:
        if world.main:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def run_eval(epoch: float) -> dict:
        """Eval loss and chrF on rank 0 (the others wait: the eval set is small by design); sharded, every rank
        takes part in each forward, and generation steps in lockstep."""
        record = {}
        if held and (world.main or world.shard):
            model.eval()
            record = {"step": step, "epoch": round(epoch, 3),
                      "eval_loss": evaluate.eval_loss(loss_fn, held, cfg.batch_size, pad, dev)}
            if cfg.eval_samples:
                with world.gathered(loss_fn):
                    pairs = evaluate.generate_samples(model, tokenizer, held[:cfg.eval_samples], dev,
                                                      synced=world.shard)
                record["eval_chrf"] = evaluate.chrf(pairs)
                record["eval_samples"] = [{"generated": g[:500], "reference": r[:500]} for g, r in pairs[:2]]
            log(record)
            say(f"epoch {epoch:g}: eval loss {record['eval_loss']:.4f}"
                + (f", chrF {record['eval_chrf']:.1f}" if "eval_chrf" in record else ""))
            model.train()
        world.barrier()
        return record

    model.train()
    started, tokens_seen, last_eval = time.perf_counter(), 0, {}
    start_step = step
    while step < total:
        window = []
        for k in range(cfg.grad_accum):
            window.append([encoded[i] for i in micro_batch(position + k * world.size + world.rank)])
        position += cfg.grad_accum * world.size
        n_tokens = world.sum(sum(labelled_tokens(items) for items in window))  # the mean is over the whole window
        loss_total = 0.0
        for k, items in enumerate(window):
            ids, labels, mask, positions = (t.to(dev) if t is not None else None for t in collate(items, pad))
            with world.accumulating(runner, sync=k == len(window) - 1):
                loss = runner(ids, labels, mask, positions) * (world.size / max(1, n_tokens))  # gradients are averaged
                loss.backward()
            loss_total += loss.item() / world.size
            tokens_seen += sum(len(item[0]) for item in items)
        loss_total = world.sum(loss_total)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        lr = scheduler.get_last_lr()[0]
        speed = world.sum(tokens_seen) / max(elapsed, 1e-9)
        record = {"step": step, "loss": loss_total, "lr": lr, "tokens_per_s": speed, "elapsed_s": elapsed}
        if dev.type == "cuda":  # (rank 0's: the ranks hold alike)
            record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3)
        log(record)
        if world.main:
            on_progress(Progress(step, total, loss_total, lr, speed, elapsed / (step - start_step) * (total - step)))
        epoch_done = position // batches_per_epoch > (position - cfg.grad_accum * world.size) // batches_per_epoch
        if epoch_done or step == total:
            last_eval = run_eval(position / batches_per_epoch) or last_eval
        if step % cfg.save_every == 0 or step == total or (stop_after and step >= stop_after):
            rng = world.gather(world.rng_state())  # every rank's, so a resume restores each one's own
            adapter, optimized = world.adapter_state(model), world.optimizer_state(model, optimizer)
            if world.main:
                _checkpoint(model, adapter, optimized, scheduler, workdir / f"checkpoint-{step}", step, position, rng)
            world.barrier()
        if stop_after and step >= stop_after and step < total:
            say(f"stopped after step {step}; continue with --resume")
            world.close()
            return None

    adapter = world.adapter_state(model)
    if not world.main:
        world.close()
        return None
    plot_path = workdir / "training.png"
    from codellm.trainer.plot import plot_metrics

    plot_metrics(metrics_path, plot_path)
    adapter_dir = workdir / "adapter"
    model.save_pretrained(adapter_dir, state_dict=adapter)
    entry = _register(registry, target, entry, adapter_dir, metrics_path, plot_path, cfg, fmt, template, data_hash,
                      quantize, n_examples, world.size, last_eval)
    world.close()
    return entry


def _checkpoint(model, adapter: dict | None, optimized: dict, scheduler, path: Path, step: int, position: int,
                rng: list) -> None:
    """``adapter``: the gathered adapter of a sharded model (None: the model's own); ``optimized``: the optimizer's
    state."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, state_dict=adapter)
    torch.save(optimized, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "position": position}))
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a stopped run logged after its last checkpoint (``step``): the resumed run logs those
    steps again, and the log must read as one run's."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _register(registry, target, base_entry, adapter_dir: Path, metrics_path: Path, plot_path: Path, cfg: TrainConfig,
              fmt: str, template: str, data_hash: str, quantize, n_examples: int, processes: int, last_eval: dict):
    """The adapter lands in the registry: adapter files, training record, curves; it names its base by digest."""
    from codellm.registry.create import import_dir

    layers, _ = import_dir(registry, adapter_dir, adapter=True)
    final = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "loss" in r][-1]
    final.update({k: v for k, v in last_eval.items() if k in ("eval_loss", "eval_chrf")})
    record = {"config": msgspec.to_builtins(cfg), "data_format": fmt, "template": template, "data": data_hash,
              "examples": n_examples, "method": "qlora-nf4" if quantize else "lora", "processes": processes,
              "final": final}
    layers.append(registry.add_layer_bytes(mt.TRAINING, json.dumps(record, indent=2).encode(), "training.json"))
    layers.append(registry.add_layer_file(mt.TRAINING, metrics_path, "metrics.jsonl"))
    if plot_path.exists():
        layers.append(registry.add_layer_file(mt.TRAINING, plot_path, "training.png"))
    base_cfg = base_entry.manifest.config
    config = msgspec.structs.replace(base_cfg, source="trained", base=str(base_entry.name), base_digest=base_entry.digest,
                                     parameters=None, format="safetensors")
    return registry.save(target, mt.Manifest(config=config, layers=layers))
