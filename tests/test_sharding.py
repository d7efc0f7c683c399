"""Tensor parallelism on CPU: the sharding plan, and two gloo ranks each holding half of every layer giving the
whole model's greedy tokens and logits (fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codellm.engine import sharding


def test_plan_divides_heads_kv_heads_and_columns():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    assert sharding.plan(cfg, 4) == sharding.Plan(world=4, heads=8, kv_heads=2, head_dim=128, intermediate=3584)
    with pytest.raises(ValueError, match="key/value heads"):
        sharding.plan(cfg, 16)  # 8 KV heads do not divide over 16 ranks
    with pytest.raises(ValueError, match="at least one"):
        sharding.plan(cfg, 0)


def test_a_rank_reads_only_its_share_of_the_checkpoint(tmp_path):
    """``sharding.load`` builds an empty model, cuts it and fills it from slices of the safetensors files: the same
    tensors as loading the whole model and cutting it (biases of column-parallel layers cut, an untied LM head
    whole), with the rotary frequencies, which no checkpoint holds, made for real."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from codellm.engine import kvcache

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    attn = kvcache.register()
    for rank in range(2):
        whole = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=attn).eval()
        sharding.shard(whole, rank, 2)
        got = sharding.load(tmp_path, rank, 2, device=torch.device("cpu"), dtype=torch.float32, attn_implementation=attn)
        want, have = whole.state_dict(), got.state_dict()
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) for k in want), [k for k in want if not torch.equal(want[k], have[k])]
        assert got.model.layers[0].self_attn.q_proj.bias.shape == (32,) and got.config.num_key_value_heads == 1
        assert all(not t.is_meta for t in [*got.parameters(), *got.buffers()])
        assert isinstance(got.model.layers[1].mlp.down_proj, sharding.RowParallelLinear)


def test_quantized_weights_are_not_split_over_ranks(served_home):
    from codellm.engine import loader
    from codellm.errors import Refused
    from codellm.registry import Registry

    registry = Registry(served_home, read_only=True)
    entry, weights = loader.resolve(registry, "tiny-coder")
    with pytest.raises(Refused, match="not split over ranks"):
        loader.load_weights(registry, entry, weights, quantize="nf4", shard=(0, 2))


@pytest.mark.timeout(600)
def test_sharded_ranks_match_the_whole_model(tiny_dir, tmp_path):
    """Each rank holds half of every layer's heads and MLP columns, with two all-reduces a layer: both give the
    unsharded model's 32 greedy tokens and, through the engine's paged attention and fused projections, its
    logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import free_port
    import shard_check

    whole = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = whole.generate(torch.tensor([shard_check.PROMPT]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(shard_check.PROMPT):]
        ref_logits = whole(input_ids=torch.tensor([shard_check.PROMPT])).logits[0, -1]
    init = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "shard_check.py"), str(tiny_dir), str(r), "2",
                               init, str(tmp_path / f"rank{r}.safetensors")], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [p.communicate(timeout=540)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    for r in range(2):
        got = load_file(tmp_path / f"rank{r}.safetensors")
        assert got["tokens"].tolist() == ref.tolist()
        torch.testing.assert_close(got["logits"], ref_logits, rtol=1e-4, atol=1e-4)


def test_tensor_parallel_server_answers_as_one_process(served_home, tiny_dir):
    """`codellm serve --tensor-parallel 2` on CPU: rank 0 (the engine process) schedules, and every forward it runs
    is relayed to rank 1 over gloo. Concurrent greedy completions are the unsharded model's, token for token (a prompt
    that continues cached blocks too); what
    needs the whole model in one process (embeddings) is a clear 400; the ranks exit with the server."""
    import concurrent.futures

    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import Server

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    whole = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    long = "import csv\nimport json\n\n\ndef read_rows(path):\n    with open(path) as fh:\n        return list(csv.reader(fh))\n\n\ndef main(path):\n    rows = read_rows(path)\n    print(json.dumps(rows))\n"
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def", "import csv\n\ndef read_csv(path):\n    with", long]
    refs = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            out = whole.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):]
            refs.append(tok.decode(out, skip_special_tokens=True))
    srv = Server(served_home, "--tensor-parallel", "2", "--num-ctx", "512")
    try:
        cached = []

        def complete(p):
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "model": "tiny-coder", "prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # batched together
            assert list(pool.map(complete, prompts)) == refs
        assert complete(long) == refs[-1] and cached[-1] >= 16  # a prompt continuing cached blocks, on both ranks
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": "tiny-coder", "input": "x"}, timeout=120)
        assert r.status_code == 400 and "tensor-parallel" in r.json()["error"]["message"], r.text
        assert complete(prompts[0]) == refs[0]  # and it still serves
        ranks = _ranks()
        assert ranks, "no rank 1 process"
    finally:
        srv.stop()
    deadline = time.monotonic() + 120
    while set(_ranks()) & set(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_ranks()) & set(ranks), "rank 1 outlived the server"


def _ranks() -> list[str]:
    """Processes running a rank of a tensor-parallel engine (``python -m codellm.engine.sharding``)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"codellm.engine.sharding" in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.timeout(300)
def test_a_rank_that_cannot_load_fails_the_start_at_once(served_home):
    """A rank loads its weights before the group forms, so one that fails (here: a model its registry lacks) exits
    first, and rank 0 reports it within seconds instead of waiting out the group's five-minute timeout."""
    from conftest import free_port

    start = (f"from codellm.engine import sharding; sharding.Ranks.spawn(2, ({str(served_home)!r}, True, "
             f"'library/no-such-model:latest', {{}}), 'tcp://127.0.0.1:{free_port()}', 'gloo').join()")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    r = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "rank 1 exited (code 1) before joining" in r.stderr, r.stderr[-2000:]
    assert "no-such-model" in r.stderr  # the rank's own error, in the log it shares
