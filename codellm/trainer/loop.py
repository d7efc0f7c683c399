"""LoRA / QLoRA fine-tuning of a registry model, ending as an adapter model in the registry.

On a GPU the base loads in nf4 (double quantization, bf16 compute) with paged 8-bit AdamW; on CPU it
is plain LoRA over fp32 weights with torch AdamW, and says so. Loss is a mean over response tokens
across the whole accumulation window (not a mean of per-batch means). Checkpoints hold the adapter,
optimizer, scheduler, RNG and data position, so ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
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
    packing: bool = False  # several samples per row, isolated from each other


PRESETS: dict[str, dict] = {
    # the origin projects' setups (artidoro/qlora defaults; bf16 compute where the GPU has it, not fp16)
    "llama2-7b-python-18k": dict(r=64, alpha=16, dropout=0.1, lr=2e-4, batch_size=4, max_grad_norm=0.3,
                                 warmup_ratio=0.03, epochs=1.0, template="alpaca", max_len=1024),
    "llama3.2-1b-apps": dict(r=16, alpha=32, dropout=0.05, lr=7e-5, epochs=10.0, batch_size=4,
                             target_modules="q_proj,k_proj,v_proj,o_proj", max_len=2048),
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


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


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


def _collate(items: list[tuple], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(ids, labels, attention mask, position ids): packed rows carry positions and no mask."""
    width = max(len(item[0]) for item in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    packed = len(items[0]) == 3
    positions = torch.zeros((len(items), width), dtype=torch.long) if packed else None
    for row, item in enumerate(items):
        i, lab = item[0], item[1]
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
        if packed:  # padding continues as one more "sample" of its own
            positions[row, :len(i)] = torch.tensor(item[2])
            positions[row, len(i):] = torch.arange(width - len(i))
    return ids, labels, (None if packed else mask), positions


def _token_loss_sum(model, ids, labels, mask, positions=None) -> torch.Tensor:
    """Sum of next-token losses over labelled positions (so accumulation can divide by the window's count)."""
    if positions is not None:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1].float()
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


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
    when ``stop_after`` stopped the run early, leaving a checkpoint to resume from)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from codellm.engine.loader import resolve, weights_identity
    from codellm.registry.names import ModelName

    cfg = config or TrainConfig()
    target = ModelName.parse(name)
    entry, weights = resolve(registry, base)
    if entry.manifest.is_adapter:
        raise InvalidRequest(f"{base} is an adapter: train on its base model ({entry.manifest.config.base})")
    workdir = registry.home / "train" / f"{target.namespace}--{target.model}--{target.tag}"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantize = cfg.quantize if cfg.quantize is not None else ("nf4" if dev.type == "cuda" else None)
    if quantize and dev.type != "cuda":
        raise InvalidRequest("nf4 (QLoRA) needs a CUDA GPU; on CPU codellm trains plain LoRA", param="quantize")
    status(f"{'QLoRA (nf4 base, bf16 compute)' if quantize else 'LoRA (no GPU: plain LoRA on fp32 weights)'} on {dev}")

    examples, fmt, data_hash = datamod.load_examples(data_path, cfg.format)
    model_dir = registry.files_dir(weights, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{weights_identity(weights)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = cfg.template
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) and fmt in ("chat", "alpaca") else "alpaca"
    encoded, dropped, truncated = [], 0, 0
    for ex in examples:
        item = encode(ex, tokenizer, template, cfg.max_len)
        if item is None:
            dropped += 1
            continue
        ids, labels, cut = item
        truncated += cut
        encoded.append((ids, labels))
    status(f"{len(encoded)} examples ({fmt}, {template} template); {truncated} truncated to {cfg.max_len} tokens, "
           f"{dropped} dropped (prompt alone too long)")
    if not encoded:
        raise InvalidRequest("no example fits in max_len", param="max_len")
    n_examples = len(encoded)
    if cfg.packing:
        encoded = pack(encoded, cfg.max_len)
        status(f"packed into {len(encoded)} rows of up to {cfg.max_len} tokens")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": dev}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kwargs)
    if not quantize:
        model.to(dev)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(","))
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    if quantize:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    per_epoch = math.ceil(len(encoded) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * cfg.warmup_ratio), total)

    step, position = 0, 0  # optimizer steps taken, micro-batches consumed
    metrics_path = workdir / "metrics.jsonl"
    if resume:
        ckpts = sorted(workdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            raise InvalidRequest(f"nothing to resume: no checkpoint in {workdir}")
        last = ckpts[-1]
        set_peft_model_state_dict(model, load_file(last / "adapter_model.safetensors"))
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=True))
        state = json.loads((last / "state.json").read_text())
        step, position = state["step"], state["position"]
        torch.set_rng_state(torch.load(last / "rng.pt", weights_only=True))
        status(f"resuming at step {step} from {last.name}")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)

    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)

    def micro_batch(index: int) -> list[int]:
        """The index-th micro-batch of the run: each epoch's shuffle depends only on the seed and the epoch."""
        epoch, within = divmod(index, batches_per_epoch)
        order = list(range(len(encoded)))
        random.Random(cfg.seed + epoch).shuffle(order)
        return order[within * cfg.batch_size:(within + 1) * cfg.batch_size]

    model.train()
    started, tokens_seen = time.perf_counter(), 0
    while step < total:
        window, n_tokens = [], 0
        for _ in range(cfg.grad_accum):
            items = [encoded[i] for i in micro_batch(position)]
            position += 1
            window.append(items)
            n_tokens += sum(sum(1 for t in item[1][1:] if t != IGNORE) for item in items)
        loss_total = 0.0
        for items in window:
            ids, labels, mask, positions = (t.to(dev) if t is not None else None
                                            for t in _collate(items, tokenizer.pad_token_id))
            loss = _token_loss_sum(model, ids, labels, mask, positions) / max(1, n_tokens)
            loss.backward()
            loss_total += loss.item()
            tokens_seen += sum(len(item[0]) for item in items)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        lr = scheduler.get_last_lr()[0]
        record = {"step": step, "loss": loss_total, "lr": lr, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                  "elapsed_s": elapsed}
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        on_progress(Progress(step, total, loss_total, lr, record["tokens_per_s"], elapsed / step * (total - step)))
        if step % cfg.save_every == 0 or step == total or (stop_after and step >= stop_after):
            _checkpoint(model, optimizer, scheduler, workdir / f"checkpoint-{step}", step, position)
        if stop_after and step >= stop_after and step < total:
            status(f"stopped after step {step}; continue with --resume")
            return None

    plot_path = workdir / "training.png"
    from codellm.trainer.plot import plot_metrics

    plot_metrics(metrics_path, plot_path)
    adapter_dir = workdir / "adapter"
    model.save_pretrained(adapter_dir)
    return _register(registry, target, entry, adapter_dir, metrics_path, plot_path, cfg, fmt, template, data_hash,
                     quantize, n_examples)


def _checkpoint(model, optimizer, scheduler, path: Path, step: int, position: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "position": position}))
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _register(registry, target, base_entry, adapter_dir: Path, metrics_path: Path, plot_path: Path, cfg: TrainConfig,
              fmt: str, template: str, data_hash: str, quantize, n_examples: int):
    """The adapter lands in the registry: adapter files, training record, curves; it names its base by digest."""
    from codellm.registry.create import import_dir

    layers, _ = import_dir(registry, adapter_dir, adapter=True)
    final = [json.loads(line) for line in metrics_path.read_text().splitlines()][-1]
    record = {"config": msgspec.to_builtins(cfg), "data_format": fmt, "template": template, "data": data_hash,
              "examples": n_examples, "method": "qlora-nf4" if quantize else "lora", "final": final}
    layers.append(registry.add_layer_bytes(mt.TRAINING, json.dumps(record, indent=2).encode(), "training.json"))
    layers.append(registry.add_layer_file(mt.TRAINING, metrics_path, "metrics.jsonl"))
    if plot_path.exists():
        layers.append(registry.add_layer_file(mt.TRAINING, plot_path, "training.png"))
    base_cfg = base_entry.manifest.config
    config = msgspec.structs.replace(base_cfg, source="trained", base=str(base_entry.name), base_digest=base_entry.digest,
                                     parameters=None, format="safetensors")
    return registry.save(target, mt.Manifest(config=config, layers=layers))
