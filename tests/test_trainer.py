"""LoRA training and merge on a tiny model (CPU): data errors, loss masking, learning, exact resume,
merge equivalence, and both models answering through the server."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from codellm.errors import InvalidRequest
from codellm.registry import Registry
from codellm.registry import manifest as mt
from codellm.trainer.data import load_examples
from conftest import Server, run_cli

FACTS = [  # prompts that differ early and in length: a LoRA on a 64-wide model must tell them apart
    ("Which module reads CSV files?", "csv"),
    ("Name the stack method that removes an item from the top of the stack in Python.", "pop"),
]


@pytest.fixture()
def alpaca_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in FACTS))
    return path


@pytest.fixture()
def base_home(tmp_path, tiny_dir):
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path / "home"
    create(Registry(home), "qwen2.5-coder:tiny", Modelfile(from_=str(tiny_dir)))
    return home


def test_malformed_data_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{not json\n')
    with pytest.raises(InvalidRequest, match=r"bad.jsonl:3: not valid JSON"):
        load_examples(bad)
    missing = tmp_path / "bad.csv"
    missing.write_text("instruction,output\nhello,world\n,oops\n")
    with pytest.raises(InvalidRequest, match=r"bad.csv:3: needs string fields"):
        load_examples(missing, "alpaca")
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(InvalidRequest, match="last message must be the assistant"):
        load_examples(chat)
    r = run_cli("train", "x", "--data", str(bad), "--name", "y", env={"CODELLM_HOME": str(tmp_path / "h")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().startswith("Error:")


def test_prompt_tokens_are_masked(tiny_dir, alpaca_file):
    from transformers import AutoTokenizer

    from codellm.trainer.prompts import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    examples, fmt, _ = load_examples(alpaca_file)
    assert fmt == "alpaca"
    for template in ("chat", "alpaca"):
        ids, labels, truncated = encode(examples[0], tok, template, 512)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert all(lab == IGNORE for lab in labels[:first]) and labels[first:] == ids[first:]
        assert tok.decode(ids[first:], skip_special_tokens=True).strip() == "csv"
        assert ids[-1] == tok.eos_token_id and not truncated  # the model learns to stop
        assert "Which module reads CSV files?" in tok.decode(ids[:first])
    ids, labels, _ = encode(examples[0], tok, "chat", 512)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    cut = encode(examples[0], tok, "chat", first + 1)  # room for one response token
    assert cut[2] and len(cut[0]) == first + 1 and cut[1][-1] != IGNORE
    assert encode(examples[0], tok, "chat", first) is None  # not even the prompt fits: dropped


def test_resume_matches_an_uninterrupted_run(base_home, alpaca_file):
    from codellm.trainer.loop import TrainConfig, train

    reg = Registry(base_home)
    cfg = TrainConfig(max_steps=6, batch_size=2, grad_accum=2, lr=3e-3, r=4, alpha=8, save_every=100, max_len=256)
    train(reg, "qwen2.5-coder:tiny", alpaca_file, "straight", cfg)
    assert train(reg, "qwen2.5-coder:tiny", alpaca_file, "resumed", cfg, stop_after=3) is None
    assert not reg.exists("resumed")
    train(reg, "qwen2.5-coder:tiny", alpaca_file, "resumed", cfg, resume=True)
    a = load_file(reg.home / "train" / "library--straight--latest" / "adapter" / "adapter_model.safetensors")
    b = load_file(reg.home / "train" / "library--resumed--latest" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in a)
    la = [json.loads(x)["loss"] for x in (reg.home / "train" / "library--straight--latest" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (reg.home / "train" / "library--resumed--latest" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def test_resume_after_a_kill_logs_each_step_once(base_home, alpaca_file):
    """A run killed after logging steps past its last checkpoint: the resumed log reads as one run's."""
    import shutil

    from codellm.trainer.loop import TrainConfig, train

    reg = Registry(base_home)
    cfg = TrainConfig(max_steps=6, batch_size=2, grad_accum=1, lr=3e-3, r=4, alpha=8, save_every=2, max_len=256)
    assert train(reg, "qwen2.5-coder:tiny", alpaca_file, "killed", cfg, stop_after=3) is None
    work = reg.home / "train" / "library--killed--latest"
    shutil.rmtree(work / "checkpoint-3")  # as if killed after step 3 was logged, before its checkpoint
    train(reg, "qwen2.5-coder:tiny", alpaca_file, "killed", cfg, resume=True)
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_train_learns_serves_and_merges(base_home, alpaca_file):
    env = {"CODELLM_HOME": str(base_home)}
    r = run_cli("train", "qwen2.5-coder:tiny", "--data", str(alpaca_file), "--name", "facts", "--max-steps", "100",
                "--batch-size", "2", "--lr", "5e-3", "--rank", "16", "--alpha", "32", "--max-len", "256",
                "--warmup-ratio", "0.1", "--dropout", "0", "--max-grad-norm", "1.0", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "plain LoRA" in r.stderr and "2 examples" in r.stderr
    reg = Registry(base_home)
    made = reg.get("facts").manifest
    assert made.is_adapter and made.config.base == "qwen2.5-coder:tiny"
    assert made.config.base_digest == reg.get("qwen2.5-coder:tiny").digest
    record = json.loads(reg.read_layer(next(l for l in made.layers_of(mt.TRAINING) if l.filename == "training.json")))
    assert record["data"].startswith("sha256:") and record["method"] == "lora"
    work = base_home / "train" / "library--facts--latest"
    losses = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 100 and losses[-1] < 0.1 < losses[0]
    assert (work / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = run_cli("merge", "facts", "--as", "facts-merged", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.strip().split()[-1])
    assert diff < 1e-3
    merged = reg.get("facts-merged").manifest
    base = reg.get("qwen2.5-coder:tiny").manifest
    assert {l.digest for l in base.layers_of(mt.TOKENIZER)} <= {l.digest for l in merged.layers}  # shared blobs
    assert merged.layer(mt.WEIGHTS).digest != base.layer(mt.WEIGHTS).digest

    import openai

    srv = Server(base_home, "--num-ctx", "512")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        for model in ("facts", "facts-merged"):
            for question, answer in FACTS:
                got = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                     temperature=0, max_tokens=8).choices[0]
                assert got.message.content.strip() == answer and got.finish_reason == "stop"
    finally:
        srv.stop()


def test_presets_and_overrides():
    from codellm.trainer.loop import PRESETS, preset

    cfg = preset("llama2-7b-python-18k", lr=1e-4)
    assert (cfg.r, cfg.alpha, cfg.max_grad_norm, cfg.template, cfg.lr) == (64, 16, 0.3, "alpaca", 1e-4)
    assert preset("llama3.2-1b-apps").target_modules == "q_proj,k_proj,v_proj,o_proj" and set(PRESETS) == {
        "llama2-7b-python-18k", "llama3.2-1b-apps"}
    with pytest.raises(InvalidRequest):
        preset("nope")


def test_packed_rows_give_the_same_loss_as_separate_samples(tiny_dir, alpaca_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codellm.trainer.loop import pack
    from codellm.trainer.loss import CausalLMLoss, collate
    from codellm.trainer.prompts import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    examples, _, _ = load_examples(alpaca_file)
    encoded = [encode(e, tok, "chat", 256)[:2] for e in examples] + [
        (ids, [IGNORE] + ids[1:]) for ids in [tok("def add(a, b):\n    return a + b\n")["input_ids"]]]
    rows = pack(encoded, 256)
    assert len(rows) < len(encoded)  # several samples share a row
    chunked, plain = CausalLMLoss(model, chunk_elements=7 * model.config.vocab_size), CausalLMLoss(model)
    plain.chunked = False
    assert chunked.chunked and chunked.chunk == 128  # the smallest chunk: several per batch here
    with torch.no_grad():
        separate = sum(plain(*collate([e], tok.pad_token_id)).item() for e in encoded)
        packed = plain(*collate(rows, tok.pad_token_id)).item()
        packed_chunked = chunked(*collate(rows, tok.pad_token_id)).item()
    assert packed == pytest.approx(separate, rel=1e-4)
    assert packed_chunked == pytest.approx(packed, rel=1e-5)  # chunked head + loss == full logits
    n_sep = sum(sum(1 for t in lab[1:] if t != IGNORE) for _, lab in encoded)
    assert n_sep == sum(sum(1 for t in r[1][1:] if t != IGNORE) for r in rows)


def test_chunked_loss_gradients_match_full_logits(tiny_dir, alpaca_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codellm.trainer.loss import CausalLMLoss, collate
    from codellm.trainer.prompts import encode

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    examples, _, _ = load_examples(alpaca_file)
    batch = collate([encode(e, tok, "chat", 256)[:2] for e in examples], tok.pad_token_id)
    grads = []
    for chunked in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa")
        loss = CausalLMLoss(model, chunk_elements=8 * model.config.vocab_size)
        loss.chunked = chunked
        loss(*batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6) for n in grads[0])


def test_training_with_packing_runs_and_registers(base_home, alpaca_file):
    from codellm.trainer.loop import TrainConfig, train

    messages = []
    entry = train(Registry(base_home), "qwen2.5-coder:tiny", alpaca_file, "packed",
                  TrainConfig(packing=True, max_steps=3, batch_size=1, lr=1e-3, r=4, alpha=8, max_len=256),
                  status=messages.append)
    assert any(m.startswith("packed into 1 rows") for m in messages) and entry.manifest.is_adapter


def _alpaca_rows(n: int) -> list[dict]:
    """``n`` small Alpaca records (distinct, code-flavoured)."""
    ops = [("add", "+"), ("subtract", "-"), ("multiply", "*"), ("divide", "/")]
    rows = []
    for i in range(n):
        name, op = ops[i % len(ops)]
        rows.append({"instruction": f"Write a Python function {name}_{i} that combines two numbers with {name}.",
                     "input": "", "output": f"def {name}_{i}(a, b):\n    return a {op} b\n"})
    return rows


def test_parquet_data_from_a_hub_dataset_with_eval_split(tmp_path, base_home):
    """`--data owner/name` downloads a dataset repo through huggingface_hub (from a local hub mirror), reads
    its Parquet train split, holds out an eval split and logs eval loss and chrF; bad data is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hubmirror import HubMirror

    repo = tmp_path / "dataset"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_alpaca_rows(24)), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_alpaca_rows(3)), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    examples, fmt, digest = load_examples(repo)  # a local folder: its train files only
    assert len(examples) == 24 and fmt == "alpaca" and digest.startswith("sha256:")

    with HubMirror() as mirror:
        mirror.add("acme/py-instruct", repo, repo_type="dataset")
        env = {"CODELLM_HOME": str(base_home), "HF_ENDPOINT": mirror.url, "HF_HUB_CACHE": str(tmp_path / "hf")}
        r = run_cli("train", "qwen2.5-coder:tiny", "--data", "acme/py-instruct", "--name", "hub-trained", "--max-steps", "4",
                    "--batch-size", "4", "--eval-split", "0.25", "--eval-samples", "2", "--max-len", "256", "--rank", "4",
                    "--alpha", "8", env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "downloading dataset acme/py-instruct" in r.stderr and "18 train / 6 eval examples" in r.stderr
        assert any(p.startswith("GET /datasets/acme/py-instruct/resolve/") and p.endswith("train-00000-of-00001.parquet")
                   for p in mirror.requests)
        missing = run_cli("train", "qwen2.5-coder:tiny", "--data", "acme/nope", "--name", "x", env=env)
        assert missing.returncode != 0 and "no dataset acme/nope on the hub" in missing.stderr

    work = base_home / "train" / "library--hub-trained--latest"
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in records if "eval_loss" in x]
    assert len([x for x in records if "loss" in x]) == 4 and len(evals) == 1
    assert evals[0]["eval_loss"] > 0 and 0 <= evals[0]["eval_chrf"] <= 100 and len(evals[0]["eval_samples"]) == 2
    reg = Registry(base_home)
    made = reg.get("hub-trained").manifest
    record = json.loads(reg.read_layer(next(l for l in made.layers_of(mt.TRAINING) if l.filename == "training.json")))
    assert record["final"]["eval_loss"] == evals[0]["eval_loss"] and record["examples"] == 18

    bad = tmp_path / "bad.parquet"
    rows = _alpaca_rows(3)
    del rows[2]["output"]
    rows[2]["response"] = "x"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    with pytest.raises(InvalidRequest, match=r"bad.parquet:3: needs string fields 'instruction' and 'output'"):
        load_examples(bad, "alpaca")


def _torchrun(home, args: list[str]):
    """``torchrun --nproc-per-node 2 -m codellm train ARGS`` (gloo on CPU): its completed process."""
    import os
    import subprocess
    import sys

    import torch  # noqa: F401  (torch.distributed.run is torchrun)

    # gloo on the loopback interface: a machine whose host name resolves elsewhere can leave the ranks waiting
    env = {**os.environ, "CODELLM_HOME": str(home), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "codellm",
           "train", *args]
    try:  # ~15 s; a launch whose rendezvous stalls (seen once on a loaded 2-core machine) is tried once more
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=270)
    except subprocess.TimeoutExpired:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=270)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sharded_training_refuses_what_it_cannot_shard(base_home, alpaca_file):
    """--fsdp shards a 16-bit base with torch's AdamW: nf4 and bitsandbytes' paged optimizer are refused up front."""
    from codellm.trainer.loop import TrainConfig, train

    reg = Registry(base_home)
    with pytest.raises(InvalidRequest, match="fsdp.*not nf4"):
        train(reg, "qwen2.5-coder:tiny", alpaca_file, "x", TrainConfig(fsdp=True, quantize="nf4"))
    with pytest.raises(InvalidRequest, match="fsdp.*paged optimizer"):
        train(reg, "qwen2.5-coder:tiny", alpaca_file, "x", TrainConfig(fsdp=True, optimizer="paged_adamw_8bit"))
    assert not (base_home / "train" / "library--x--latest").exists()


@pytest.mark.timeout(900)  # four launches at most (below)
@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_data_parallel_run_matches_a_single_process(tmp_path, base_home, sharded):
    """`torchrun --nproc-per-node 2 -m codellm train` (gloo on CPU) takes the same steps as one process
    accumulating the same global batch: same losses, same adapter; rank 0 alone writes. Sharded (``--fsdp``), the
    run also evaluates (every rank in each forward, generating in lockstep), checkpoints (states gathered), stops and
    resumes, and still matches."""
    from codellm.trainer.loop import TrainConfig, train

    data = tmp_path / "ops.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _alpaca_rows(10 if sharded else 8)))
    reg = Registry(base_home)
    split = 0.2 if sharded else 0.0
    train(reg, "qwen2.5-coder:tiny", data, "single", TrainConfig(max_steps=3, batch_size=2, grad_accum=2, dropout=0.0,
          eval_split=split, eval_samples=1, lr=1e-3, r=4, alpha=8, max_len=128, seed=1))
    name = "fsdp" if sharded else "ddp"
    args = ["qwen2.5-coder:tiny", "--data", str(data), "--name", name, "--max-steps", "3", "--batch-size", "2",
            "--dropout", "0", "--eval-split", str(split), "--eval-samples", "1", "--lr", "1e-3", "--rank", "4",
            "--alpha", "8", "--max-len", "128", "--seed", "1"]
    if sharded:
        first = _torchrun(base_home, [*args, "--fsdp", "--save-every", "1", "--stop-after", "2"])
        assert "base and adapter sharded (FSDP)" in first.stderr and "stopped after step 2" in first.stderr
        r = _torchrun(base_home, [*args, "--fsdp", "--save-every", "1", "--resume"])
        assert "resuming at step 2" in r.stderr
    else:
        r = _torchrun(base_home, args)
    assert "data-parallel over 2 processes" in r.stderr

    def records(name):
        path = base_home / "train" / f"library--{name}--latest" / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    def losses(name):
        return [x["loss"] for x in records(name) if "loss" in x]

    assert len(losses(name)) == 3 and losses(name) == pytest.approx(losses("single"), rel=1e-4)
    evals = [x["eval_loss"] for x in records(name) if "eval_loss" in x]
    assert evals == pytest.approx([x["eval_loss"] for x in records("single") if "eval_loss" in x], rel=1e-4)
    assert bool(evals) == sharded
    a = load_file(base_home / "train" / "library--single--latest" / "adapter" / "adapter_model.safetensors")
    b = load_file(base_home / "train" / f"library--{name}--latest" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in a)
    made = reg.get(name).manifest
    record = json.loads(reg.read_layer(next(l for l in made.layers_of(mt.TRAINING) if l.filename == "training.json")))
    assert record["processes"] == 2 and record["config"]["fsdp"] == sharded


def test_an_empty_build_reads_no_weights(tiny_dir, tmp_path):
    """place="meta" (a sharded run's ranks other than 0, which receive their shards from rank 0) builds the very
    model that reading the weights builds, adapter and all, without storage and without the weight files."""
    import shutil

    import torch

    from codellm.trainer.loop import TrainConfig, load_for_training

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = TrainConfig(r=4, alpha=8)
    empty = load_for_training(no_weights, cfg, torch.device("cpu"), None, place="meta")
    read = load_for_training(tiny_dir, cfg, torch.device("cpu"), None, place="cpu")
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])

    def layout(model):
        return ([(n, p.shape, p.dtype, p.requires_grad) for n, p in model.named_parameters()],
                [(n, b.shape, b.dtype) for n, b in model.named_buffers()])

    assert layout(empty) == layout(read) and layout(read)[0]
    assert empty.generation_config.to_dict() == read.generation_config.to_dict()


def test_checkpoint_only_the_first_layers(tiny_dir, alpaca_file):
    import torch
    from transformers import AutoTokenizer
    from transformers.modeling_layers import GradientCheckpointingLayer

    from codellm.trainer.loop import TrainConfig, load_for_training
    from codellm.trainer.loss import CausalLMLoss, collate
    from codellm.trainer.prompts import encode

    model = load_for_training(tiny_dir, TrainConfig(checkpoint_layers=1, r=4, alpha=8), torch.device("cpu"), None)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    examples, _, _ = load_examples(alpaca_file)
    model.train()
    CausalLMLoss(model)(*collate([encode(e, tok, "chat", 256)[:2] for e in examples], tok.pad_token_id)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compiled_layers_match_eager(tiny_dir, alpaca_file):
    """``--compile`` (each decoder layer through torch.compile, gradient checkpointing on) computes the same
    loss and adapter gradients as the eager layers. In a fresh interpreter, as ``codellm train --compile`` runs:
    torch.compile's caches and hooks are process-wide, and what other tests in this worker left there is not what
    a user's run starts with."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_check.py")
    r = subprocess.run([sys.executable, str(script), str(tiny_dir), str(alpaca_file)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled graphs:" in r.stdout and "same loss and gradients" in r.stdout, r.stdout
