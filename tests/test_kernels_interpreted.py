"""The engine's Triton kernels on this CPU, through Triton's interpreter (``TRITON_INTERPRET=1``): the same kernel
code a GPU compiles, run on CPU tensors, against torch's own ops. Each check runs in a child process, because the
interpreter is chosen when a kernel is defined (at import) and, set for this process, it would put every other
test's CPU steps on it too. Speed is a GPU matter (benchmarks/); these check indexing, masking and layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def interpreted(code: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_silu_and_mul_matches_torch():
    """The gate over the fused gate/up projection's rows, bf16 and fp32, widths that are and are not a block's."""
    interpreted("""
        import torch, torch.nn.functional as F
        from codellm.engine import pointwise
        torch.manual_seed(0)
        for dtype, shape, width in ((torch.bfloat16, (1, 9), 1100), (torch.float32, (3, 2), 48), (torch.float32, (0,), 8)):
            both = torch.randn(*shape, 2 * width).to(dtype)
            out = pointwise.silu_and_mul(both)
            want = (F.silu(both[..., :width].float()) * both[..., width:].float()).to(dtype)
            assert out.shape == (*shape, width) and out.dtype == dtype
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol), (out - want).abs().max()
    """)


def test_rotary_matches_the_model_families():
    """q and k as strided views of a fused q/k/v projection, packed (one row of tokens) and decoding (a token a row,
    cos per row), head counts that fill a block of heads and that do not: what each family's apply_rotary_pos_emb
    gives, laid out [B, N, H, D]; a formula that differs is told apart."""
    interpreted("""
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2
        from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb as mistral
        from codellm.engine import pointwise
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        for family in (llama, qwen2, mistral):
            assert pointwise.rotary_matches(family, cpu)
        for b, n, hq, hkv, d, dtype in ((1, 11, 6, 2, 64, torch.float32), (4, 1, 4, 4, 32, torch.float32),
                                        (1, 7, 32, 8, 128, torch.bfloat16)):
            qkv = torch.randn(b, n, (hq + 2 * hkv) * d).to(dtype)
            q, k, _ = (t.view(b, n, -1, d).transpose(1, 2) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
            angles = torch.randn(b, n, d // 2).repeat(1, 1, 2)
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            assert pointwise.rotary_fits(q, cos, sin) and pointwise.rotary_fits(k, cos, sin)
            want_q, want_k = llama(q.float(), k.float(), cos.float(), sin.float())
            for x, want in ((q, want_q), (k, want_k)):
                out = pointwise.rotary(x, cos, sin)
                assert out.shape == x.shape and out.dtype == dtype
                assert out.transpose(1, 2).is_contiguous()  # [B, N, H, D] in memory
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                assert torch.allclose(out.float(), want, atol=tol, rtol=tol), (out.float() - want).abs().max()
        q = torch.randn(1, 2, 3, 48)
        assert not pointwise.rotary_fits(q, torch.randn(1, 3, 48), torch.randn(1, 3, 48))  # D/2 = 24: no kernel
        interleaved = lambda q, k, cos, sin: (q * cos, k * cos)  # another formula: the family keeps its own
        assert not pointwise.rotary_matches(interleaved, cpu)
    """)


def test_split_kv_decode_kernel_interpreted():
    """The decode kernel's own tests (tests/test_engine.py, which skip on a CPU without the interpreter): rows over
    their own lengths through scattered block-table rows, and a check's rows of one sequence read together."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "split_kv",
                           str(ROOT / "tests" / "test_engine.py")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    summary = done.stdout.strip().splitlines()[-1]
    # all but the bf16 case ran (the interpreter computes in numpy, which has no bf16)
    assert done.returncode == 0 and "4 passed, 1 skipped" in summary, done.stdout + done.stderr


def test_engine_on_the_gpu_kernels_gives_hf_greedy_tokens(served_home):
    """The tiny model served by the engine with the GPU's pointwise path taken on CPU tensors (fused norm, the Triton
    gate and rotary, the split-KV decode kernel, all interpreted): HF generate's greedy tokens, prompts chunked and
    decoding side by side, and each kernel ran."""
    out = interpreted("""
        import sys, threading, torch
        from codellm.engine import fusion, pointwise
        from codellm.engine.core import Engine
        from codellm.engine.loader import load
        from codellm.engine.sampling import SamplingParams
        from codellm.registry import Registry
        fusion._fast = lambda x: fusion.POINTWISE and not torch.compiler.is_compiling()  # the GPU's gate, on CPU
        calls = {"silu_and_mul": 0, "rotary": 0}
        def counted(name, fn):
            def call(*args):
                calls[name] += 1
                return fn(*args)
            return call
        for name in calls:
            setattr(pointwise, name, counted(name, getattr(pointwise, name)))
        lm = load(Registry(sys.argv[1]), "tiny-coder", dtype="fp32")
        prompts = ["def fibonacci(n):\\n", "class Stack:\\n    def", "import csv\\n\\ndef read_csv(path):\\n    with"]
        encoded = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        fusion.POINTWISE = False  # HF generate's reference on the model's own ops
        refs = [lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist() for ids in encoded]
        fusion.POINTWISE = True
        engine = Engine(lm, slots=4, prefill_chunk=8)
        got = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]
        def sink(i):
            def take(out):
                got[i].extend(out.token_ids)
                if out.finish_reason:
                    done[i].set()
            return take
        try:
            for i, ids in enumerate(encoded):
                engine.submit(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), sink(i))
            assert all(d.wait(300) for d in done)
        finally:
            engine.shutdown()
        assert got == refs, (got, refs)
        assert pointwise._CHECKED and all(pointwise._CHECKED.values())  # the kernel, not the compiled fallback
        assert calls["silu_and_mul"] and calls["rotary"] > 2, calls  # (the family check itself calls it twice)
        print("ok", calls)
    """, str(served_home))
    assert out.startswith("ok")
