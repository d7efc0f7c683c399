"""Engine pieces on a real tiny model: greedy parity with HF generate, detokenization, stops, sampling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from codellm.engine.detok import IncrementalDetokenizer, StopMatcher
from codellm.engine.sampling import SamplingParams, sample


class TokenSink:
    """Collects one sequence's token ids from the engine thread and says when it has finished."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.first = threading.Event()  # its first token came

    def __call__(self, out) -> None:
        self.tokens.extend(out.token_ids)
        if self.tokens:
            self.first.set()
        if out.finish_reason:
            self.done.set()


@pytest.fixture(scope="module")
def loaded(served_home):
    from codellm.engine.loader import load
    from codellm.registry import Registry

    return load(Registry(served_home), "tiny-coder", dtype="fp32")  # on a GPU too: parity is checked in fp32


def test_detokenizer_holds_partial_utf8(loaded):
    tok = loaded.tokenizer
    text = "naïve café — 日本語 🙂 ✓ ß"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces_per_token = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_per_token)  # some tokens hold only part of a character
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_graph_step_inputs_pad_past_the_batch():
    from codellm.engine.cudagraph import step_inputs

    got = step_inputs(4, [7, 8], [5, -1], [1, 0], None, [40, 99], None, 99, 3)
    assert got.tolist() == [[7, 8, 0, 0], [5, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [40, 99, 99, 99], [0, 0, 3, 3],
                            [0, 0, 0, 0]]
    got = step_inputs(2, [7, 8], [5, 6], [0, 0], [2, 1], [40, 41], [1, 1], 99, 3, [0, 1])
    assert got.tolist() == [[7, 8], [5, 6], [0, 0], [2, 1], [40, 41], [1, 1], [0, 1]] and got.dtype == torch.long


def test_table_sync_writes_exactly_the_rows_set():
    """Rows set between syncs reach the device table (scratch past each row's blocks, rows longer than the table cut),
    whatever their number: the reused host buffers grow, and the rest of the table is left alone."""
    import random

    from codellm.engine.kvcache import SYNC_BUFFERS, PagedCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = PagedCache(layers=1, blocks=512, block_size=16, rows=40, kv_heads=1, head_dim=16, max_len=1024,
                       dtype=torch.float32, device=device)
    want = torch.full(cache.table.shape, 512, dtype=torch.int32)
    rng = random.Random(0)
    for step in range(4 * SYNC_BUFFERS + 20):
        for _ in range(rng.choice([0, 1, 3, 41])):
            row, blocks = rng.randrange(41), [rng.randrange(512) for _ in range(rng.choice([0, 5, 64, 70]))]
            cache.set_row(row, blocks)
            want[row] = 512
            want[row, :min(len(blocks), cache.width)] = torch.tensor(blocks[:cache.width], dtype=torch.int32)
        cache.sync()
        assert torch.equal(cache.table.cpu(), want), step


def test_stop_matcher_spans_pieces():
    m = StopMatcher(["END", "<|x|>"])
    out = "".join(m.feed(p) for p in ["ab", "cE", "N", "Dzz"])
    assert out == "abc" and m.stopped
    m = StopMatcher(["STOP"])
    assert "".join(m.feed(p) for p in ["ST", "OR", "E"]) + m.flush() == "STORE" and not m.stopped


def test_fused_projections_share_memory_and_match(tiny_dir):
    """q/k/v and gate/up become one GEMM each inside engine steps: the same logits, no extra memory."""
    from transformers import AutoModelForCausalLM

    from codellm.engine import fusion, kvcache

    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=kvcache.register()).eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=kvcache.register()).eval()
    before = sum(p.numel() for p in fused.parameters())
    layers = fused.config.num_hidden_layers
    assert fusion.fuse(fused) == 2 * layers and fusion.fuse(fused) == 0  # attention + MLP per layer, once
    attn = fused.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in fused.parameters()) == before
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    cache = _paged(fused.config, blocks=4, max_len=16)
    with torch.inference_mode():
        with kvcache.use(kvcache.step_context(cache, [[2, 0]], torch.arange(6).unsqueeze(0))):
            step = fused(input_ids=ids, use_cache=False).logits
        ref = plain(input_ids=ids).logits
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused pointwise kernels run on GPUs")
def test_fused_pointwise_kernels_match_the_models_ops(tiny_dir):
    """On a GPU an engine step's norms, gate and rotary embedding are fused kernels (Triton's where it runs, else
    the compiled rotary and eager gate): the logits the model's own ops give, within bf16 rounding (the kernels round
    once where the ops round after each), and the kernels of each way did run."""
    from transformers import AutoModelForCausalLM

    from codellm.engine import fusion, kvcache, pointwise

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=kvcache.register(),
                                                 dtype=torch.bfloat16).cuda().eval()
    fusion.fuse(model)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 11]], device="cuda")
    cache = _paged(model.config, blocks=4, max_len=16, dtype=torch.bfloat16, device="cuda")
    logits = {}
    try:
        for way, on, kernels in (("plain", False, False), ("compiled", True, False), ("triton", True, True)):
            fusion.POINTWISE, fusion.KERNELS = on, kernels
            with torch.inference_mode(), kvcache.use(kvcache.step_context(cache, [[2, 0]], torch.arange(8).unsqueeze(0))):
                logits[way] = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        fusion.POINTWISE, fusion.KERNELS = True, True
    assert all(r.compiled is not None and not r.broken for r in fusion._ROTARY.values()) and fusion._ROTARY
    if pointwise.triton is not None:
        assert pointwise._CHECKED and all(pointwise._CHECKED.values())
    for way in ("compiled", "triton"):
        diff = (logits[way] - logits["plain"]).abs()
        assert diff.max() < 0.25 and diff.mean() < 0.01, (way, diff.max(), diff.mean())


def _paged(cfg, *, blocks: int, max_len: int, dtype=torch.float32, device="cpu", block_size: int = 4):
    from codellm.engine import kvcache

    return kvcache.PagedCache(layers=cfg.num_hidden_layers, blocks=blocks, block_size=block_size, rows=4,
                              kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
                              max_len=max_len, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_prefill_matches_each_prompt_alone(tiny_dir, dtype):
    """Prompts of different lengths packed end to end in one row, with padding and unused rows as a captured
    graph lays them out, give each prompt's own next-token logits and fill each one's blocks. Then chunks that
    continue those prompts, packed again, attend to the cached prefix: the same logits as the whole prompt alone.
    On a GPU in bf16 this is FlashAttention's variable-length kernel; elsewhere the block-diagonal mask."""
    from transformers import AutoModelForCausalLM

    from codellm.engine import fusion, kvcache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 packed prefill is the GPU's FlashAttention path")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=kvcache.register(), dtype=dtype).to(device).eval()
    fusion.fuse(model)
    cfg = model.config
    prompts = [[5, 17, 99, 3, 42, 7], [8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31]]
    tails = [[60, 61, 62], [63], [64, 65, 66, 67, 68, 69], [70, 71, 72, 73, 74]]
    tables = [[5, 1, 9], [0], [2, 7, 3, 11, 4], [8, 6]]  # blocks of 4 tokens, anywhere in the pool
    cache = _paged(cfg, blocks=12, max_len=32, dtype=dtype, device=device)
    chunks = [(p, 0, t) for p, t in zip(prompts, tables)]
    ids, positions, write, cu, last = kvcache.pack_prompts(chunks, 4, cache.scratch, width=32, rows=6)
    assert write[20:].eq(cache.scratch).all() and cu.tolist() == [0, 6, 7, 18, 20, 32, 32, 32] and last[:4].tolist() == [5, 6, 17, 19]
    assert write[:6].tolist() == [20, 21, 22, 23, 4, 5]  # block 5, then block 1
    ctx = kvcache.packed_context(cache, write.to(device), positions.to(device), cu.to(device, torch.int32), 32)
    with torch.inference_mode():
        with kvcache.use(ctx):
            packed = model(input_ids=ids.view(1, -1).to(device), position_ids=positions.view(1, -1).to(device),
                           use_cache=False, logits_to_keep=last.to(device)).logits[0]
        alone = [model(input_ids=torch.tensor([p], device=device)).logits[0, -1] for p in prompts]
        more = [(t, len(p), tab) for p, t, tab in zip(prompts, tails, tables)]
        ids, positions, write, cu, last = kvcache.pack_prompts(more, 4, cache.scratch)
        kv_index, cu_k, max_k = kvcache.pack_keys(more, 4)
        assert cu_k.tolist() == [0, 9, 11, 28, 35, 35] and max_k == 17
        ctx = kvcache.packed_context(cache, write.to(device), positions.to(device), cu.to(device, torch.int32), 6,
                                     kv_index.to(device), cu_k.to(device, torch.int32), max_k)
        with kvcache.use(ctx):
            continued = model(input_ids=ids.view(1, -1).to(device), position_ids=positions.view(1, -1).to(device),
                              use_cache=False, logits_to_keep=last.to(device)).logits[0]
        # the same chunks laid out as a captured graph takes them: padding queries and keys, unused rows
        ids, positions, write, cu, last = kvcache.pack_prompts(more, 4, cache.scratch, width=24, rows=6)
        kv_index, cu_k, max_k = kvcache.pack_keys(more, 4, cache.scratch, width=40, rows=6)
        assert cu_k.tolist() == [0, 9, 11, 28, 35, 36, 36, 36] and max_k == 40 and kv_index[35:].eq(cache.scratch).all()
        ctx = kvcache.packed_context(cache, write.to(device), positions.to(device), cu.to(device, torch.int32), 24,
                                     kv_index.to(device), cu_k.to(device, torch.int32), max_k)
        with kvcache.use(ctx):
            padded = model(input_ids=ids.view(1, -1).to(device), position_ids=positions.view(1, -1).to(device),
                           use_cache=False, logits_to_keep=last.to(device)).logits[0]
        whole = [model(input_ids=torch.tensor([p + t], device=device)).logits[0, -1] for p, t in zip(prompts, tails)]
        one = _paged(cfg, blocks=12, max_len=32, dtype=dtype, device=device)
        with kvcache.use(kvcache.step_context(one, [[0, 1, 2]], torch.arange(len(prompts[2])).unsqueeze(0))):
            model(input_ids=torch.tensor([prompts[2]], device=device), use_cache=False)
    # bf16: the two paths round differently (FlashAttention against SDPA, fused kernels against the model's own ops)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.1, atol=0.1)
    torch.testing.assert_close(packed[:4], torch.stack(alone), **tol)
    torch.testing.assert_close(continued, torch.stack(whole), **tol)
    torch.testing.assert_close(padded[:4], torch.stack(whole), **tol)
    for layer in range(cfg.num_hidden_layers):  # the third prompt's keys landed in its blocks, at its positions
        rows = cache.index([tables[2]], 11)[0].to(device)
        torch.testing.assert_close(cache.k[layer][rows], one.k[layer][:11], **tol)


def test_prefill_layouts_hold_their_chunks():
    """A bucket's prefill graph is picked by its chunks' lengths; whichever it is, its rows and longest chunk hold
    them (a chunk longer than the graph's longest would be cut short by FlashAttention's grid)."""
    from codellm.engine import cudagraph as cg

    assert cg.layout([100] * 16, 2048) == cg.SHORT and cg.layout([2048], 2048) == cg.FEW
    assert cg.layout([300] * 4, 2048) == cg.FEW and cg.layout([300] * 5, 2048) == cg.GENERAL
    assert cg.layout([256], 256) == cg.GENERAL  # a small bucket's one graph is already small
    for lengths in ([1], [256] * 8, [257], [100, 900], [1, 1, 1, 1, 1200], [64] * 32, [500, 500, 500, 500]):
        n = next(b for b in cg.PREFILL_BUCKETS if b >= sum(lengths))
        rows, longest = cg._shape(cg.layout(lengths, n), n)
        assert len(lengths) <= rows and max(lengths) <= longest and cg.layout(lengths, n) in cg._layouts(n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captured prefill graphs: the GPU fast path")
def test_prefill_graph_layouts_give_the_general_layouts_logits(served_home):
    """bf16 on a GPU, where attention is FlashAttention's: fresh and cached-prefix chunks in each layout's graph
    (short chunks, few chunks), and fresh ones with decode rows riding, give the logits of the general layout's."""
    from codellm.engine import cudagraph as cg
    from codellm.engine import kvcache
    from codellm.engine.core import Engine
    from codellm.engine.loader import load
    from codellm.registry import Registry

    engine = Engine(load(Registry(served_home), "tiny-coder", dtype="bf16"), slots=8, mixed=True)
    try:
        graphs, bs = engine.runner.graphs, engine.runner.cache.block_size

        def chunks(lengths, start=0):
            per = -(-(start + max(lengths)) // bs)
            return [([(7 * i + j) % 300 + 5 for j in range(n)], start, list(range(i * per, (i + 1) * per)))
                    for i, n in enumerate(lengths)]

        for lengths, start, want in (([100] * 5, 0, cg.SHORT), ([300, 200], 0, cg.FEW), ([200] * 3, 300, cg.SHORT),
                                     ([400, 120], 128, cg.FEW)):
            packed = chunks(lengths, start)
            n = next(b for b in graphs.prefill_buckets if b >= sum(lengths))
            assert cg.layout(lengths, n) == want
            general = graphs.prefill(packed, general=True).float().clone()
            torch.testing.assert_close(graphs.prefill(packed).float(), general, rtol=0, atol=1e-2)
            if not start:  # one decode row riding, on blocks no chunk uses
                blocks = list(range(100, 100 + -(-41 // bs)))
                engine.runner.cache.set_row(0, blocks)
                engine.runner.cache.sync()
                out = graphs.ride(packed, None, [9], [40], [0], [kvcache.cache_row(blocks, 40, bs)], [0], None)
                assert out is not None
                torch.testing.assert_close(out[0].float(), general, rtol=2e-2, atol=2e-2)  # (GEMMs one row taller)
        assert graphs.prefill_replays["riding"] == 2
    finally:
        engine.shutdown()


def _kernel_device() -> str | None:
    """Where the Triton kernels can be checked: a GPU, or the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    from codellm.engine import decode_attention

    if decode_attention.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if decode_attention.available(torch.device("cpu"), 64) else None


@pytest.mark.skipif(_kernel_device() is None, reason="the Triton kernel runs on GPUs (or under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_kv_decode_kernel_matches_sdpa(dtype):
    """Each row attends over its own length only; GQA groups share one program; lengths 1 to a few hundred."""
    from codellm.engine import decode_attention

    dev = _kernel_device()
    if dev == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes in numpy, which has no bf16")
    torch.manual_seed(0)
    rows, hq, hkv, d, keys, page = 6, 32, 8, 64, 600, 16
    pages = keys // page + 1
    k = torch.randn(rows * pages * page, hkv, d, device=dev, dtype=dtype)  # a paged pool; rows' blocks shuffled
    v = torch.randn_like(k)
    table = torch.randperm(rows * pages, device=dev).view(rows, pages).to(torch.int32)
    q = torch.randn(rows, 1, hq, d, device=dev, dtype=dtype).transpose(1, 2)[:, :, 0]  # the layout attention hands over
    lens = torch.tensor([1, 17, 64, 65, 300, 599], device=dev, dtype=torch.int32)
    out = decode_attention.decode_attention(q, k, v, table, lens, d ** -0.5, page)
    for b in range(rows):
        n = int(lens[b])
        at = (table[b].long()[:, None] * page + torch.arange(page, device=dev)).flatten()[:n]
        kb, vb = k[at].transpose(0, 1), v[at].transpose(0, 1)  # [hkv, n, d]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b, :, None].float(), kb.repeat_interleave(hq // hkv, 0).float(),
            vb.repeat_interleave(hq // hkv, 0).float())[:, 0]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out[b].float(), ref, **tol)


@pytest.mark.skipif(_kernel_device() is None, reason="the Triton kernel runs on GPUs (or under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("run", [2, 5, 8])
def test_split_kv_kernel_takes_a_sequences_rows_together(run):
    """A check's rows (one sequence's last token and drafts, consecutive, one table row) read in one program: each
    row still sees exactly the keys up to its own position, runs longer than ``run`` are cut into pieces, single rows
    and padding rows (length 1) beside them stay right, and so does every split of the keys."""
    from codellm.engine import decode_attention

    dev = _kernel_device()
    torch.manual_seed(0)
    hq, hkv, d, page = 8, 2, 64, 16
    # (sequence, position of its first row, rows): lengths around split and block edges; a run of 11 rows; padding
    layout = [(0, 38, 3), (1, 99, 1), (2, 10, 11), (3, 250, 5), (4, 0, 3)]
    pages = 20
    k = torch.randn(len(layout) * pages * page, hkv, d, device=dev)
    v = torch.randn_like(k)
    tables = torch.randperm(len(layout) * pages, device=dev).view(len(layout), pages).to(torch.int32)
    seq_rows = torch.tensor([s for s, _, n in layout for _ in range(n)], device=dev)
    lens = torch.tensor([p + j + 1 for _, p, n in layout for j in range(n)], device=dev, dtype=torch.int32)
    lens[-layout[-1][2]:] = 1  # the last run is padding: position 0 each
    table = tables[seq_rows]
    q = torch.randn(len(lens), hq, d, device=dev)
    offsets = torch.tensor([j for _, _, n in layout for j in range(n)], device=dev)  # as the verify lane's input
    out = decode_attention.decode_attention(q, k, v, table, lens, d ** -0.5, page, offsets, run)
    plain = decode_attention.decode_attention(q, k, v, table, lens, d ** -0.5, page)
    for b in range(len(lens)):
        n = int(lens[b])
        at = (table[b].long()[:, None] * page + torch.arange(page, device=dev)).flatten()[:n]
        kb, vb = k[at].transpose(0, 1), v[at].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b, :, None], kb.repeat_interleave(hq // hkv, 0), vb.repeat_interleave(hq // hkv, 0))[:, 0]
        torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(plain[b], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile + CUDA graphs: the GPU fast path")
def test_compiled_fast_path_matches_hf_generate(loaded):
    """On a GPU, in fp32: the compiled decode step captured in graphs, with fused projections and overlap."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def", "x", "import csv\n\ndef read_csv(path):\n    with"]
    refs = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        out = loaded.model.generate(torch.tensor([ids], device=loaded.device), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(ids):].tolist())
    engine = Engine(loaded, slots=4, prefill_chunk=6, compile=True)
    try:
        assert engine.runner.graphs is not None and not engine.runner.graphs.disabled and engine.runner.graphs.forward is not engine.runner.graphs._forward
        sinks = [TokenSink() for _ in prompts]
        for i, p in enumerate(prompts):
            engine.submit(tok(p, add_special_tokens=False)["input_ids"],
                          SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), sinks[i])
        assert all(sink.done.wait(300) for sink in sinks)
        assert [s.tokens for s in sinks] == refs
        assert engine.runner.graphs.forward is not engine.runner.graphs._forward  # no fallback to the uncompiled step
    finally:
        engine.shutdown()


PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def", "for i in range(10):", "import csv\n\ndef read_csv(path):\n    with"]


def _hf_greedy(loaded, prompts: list[str], new: int) -> list[list[int]]:
    """HF generate's greedy tokens for each prompt alone: what the engine must give."""
    refs = []
    for p in prompts:
        ids = loaded.tokenizer(p, add_special_tokens=False)["input_ids"]
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        refs.append(out[0, len(ids):].tolist())
    return refs


@pytest.mark.parametrize("overlap", [True, None], ids=["read-late", "read-at-once"])
@pytest.mark.parametrize("prefill_chunk", [4, 512], ids=["chunked-prefill", "batched-prefill"])
def test_greedy_matches_hf_generate_with_concurrent_batching(loaded, prefill_chunk, overlap):
    """Both ways of reading the tokens a step picks: a step late while the next runs (GPUs' default), and at once
    (CPUs')."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = PROMPTS
    refs = _hf_greedy(loaded, prompts, 32)
    # 4: prompts are chunked and interleave with decodes; 512: prompts of different lengths prefill packed in one row
    engine = Engine(loaded, slots=4, prefill_chunk=prefill_chunk, overlap=overlap)
    try:
        sinks = [TokenSink() for _ in prompts]

        for i, p in enumerate(prompts):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            engine.submit(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), sinks[i])
        assert all(sink.done.wait(60) for sink in sinks)
        for i in range(len(prompts)):
            assert sinks[i].tokens == refs[i], f"prompt {i} diverged"
        assert engine.stats.max_batch == len(prompts)
        assert engine.active() == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", [True, None], ids=["read-late", "read-at-once"])
def test_decode_rows_riding_in_prefills_match_hf_generate(loaded, overlap):
    """Decoding sequences ride in the forward of a step that prefills (``mixed``): prompts arriving while others
    decode, chunked so that several steps carry riders, give HF's greedy tokens, and rows did ride."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = PROMPTS
    refs = _hf_greedy(loaded, prompts, 24)
    engine = Engine(loaded, slots=4, prefill_chunk=8, overlap=overlap, mixed=True)
    try:
        sinks = [TokenSink() for _ in prompts]
        for i, p in enumerate(prompts):
            engine.submit(tok(p, add_special_tokens=False)["input_ids"],
                          SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), sinks[i])
            assert sinks[i].first.wait(60)  # the next prompt arrives while this one decodes
        assert all(sink.done.wait(60) for sink in sinks)
        for i in range(len(prompts)):
            assert sinks[i].tokens == refs[i], f"prompt {i} diverged"
        assert engine.stats.rides > 0 and engine.active() == 0
        if engine.runner.graphs is not None:  # on a GPU, fresh prompts and their riders ran in captured graphs
            assert engine.runner.graphs.riding_graphs and engine.runner.graphs.prefill_replays["riding"] > 0
    finally:
        engine.shutdown()


def test_decode_by_slot_with_free_and_prefilling_slots(loaded):
    """Decode rows are slots: a freed slot in the middle, then a long prompt prefilling into it in chunks,
    must not disturb the neighbours that keep decoding (their keys are read in place)."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def", "for i in range(10):",
               "import csv\n\ndef read_csv(path):\n    with open(path) as fh:\n        reader = csv"]
    budgets = [40, 5, 40, 24]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    refs = [loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist() for ids, n in zip(encoded, budgets)]
    engine = Engine(loaded, slots=4, prefill_chunk=3)
    try:
        sinks = [TokenSink() for _ in prompts]
        for i in range(3):
            engine.submit(encoded[i], SamplingParams(temperature=0, max_tokens=budgets[i], ignore_eos=True), sinks[i])
        assert sinks[1].done.wait(60)  # slot 1 is free again while slots 0 and 2 decode
        engine.submit(encoded[3], SamplingParams(temperature=0, max_tokens=budgets[3], ignore_eos=True), sinks[3])
        assert all(sink.done.wait(60) for sink in sinks)
        assert [s.tokens for s in sinks] == refs
        assert engine.active() == 0
    finally:
        engine.shutdown()


def test_pipelined_decode_stop_token_and_slot_reuse(loaded):
    """Greedy tokens are read a step late: a sequence that hits a stop token has one more row decoded on the
    device, which must be dropped, and the next prompt admitted into its slot must not see it. A greedy
    request with log-probabilities in the same batch forces the synchronous path in between."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def", "for i in range(10):"]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    refs = [loaded.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist() for ids in encoded]
    stop = refs[0][6]
    cut = refs[0].index(stop)
    engine = Engine(loaded, slots=2, prefill_chunk=512, overlap=True)  # read a step late, as on a GPU
    try:
        sinks = [TokenSink() for _ in prompts]
        logprob_sink = TokenSink()
        engine.submit(encoded[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], ignore_eos=True), sinks[0])
        engine.submit(encoded[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), sinks[1])
        engine.submit(encoded[2], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), sinks[2])
        assert sinks[0].done.wait(60)
        engine.submit(encoded[1], SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True), logprob_sink)
        assert all(sink.done.wait(60) for sink in sinks + [logprob_sink])
        assert sinks[0].tokens == refs[0][:cut]
        assert sinks[1].tokens == refs[1] and sinks[2].tokens == refs[2]  # the third reused the first one's slot
        assert logprob_sink.tokens == refs[1][:8]
        # decoded = sent, less the 4 first tokens (from prefill), plus the stop token (decoded, not sent); the row
        # decoded past the stop is not counted
        assert engine.stats.decode_tokens == sum(len(s.tokens) for s in sinks + [logprob_sink]) - 4 + 1
        assert engine.active() == 0
    finally:
        engine.shutdown()


def test_first_tokens_stay_on_the_device_until_the_next_step(loaded):
    """A prompt's first token, the plain argmax, is left on the device to feed the next decode step and read with
    that step's tokens: a first token that is a stop token still ends its choice with nothing, max_tokens 1 still
    gives exactly one token, a prompt admitted while others decode keeps its greedy output, and tokens decoded past
    an end are not counted."""
    from codellm.engine.core import Engine

    tok = loaded.tokenizer
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def", "for i in range(10):", "import csv\n\ndef read_csv(path):"]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    refs = [loaded.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist() for ids in encoded]
    engine = Engine(loaded, slots=4, prefill_chunk=512, overlap=True)  # read a step late, as on a GPU
    launched = []
    first = engine.runner.launch_first
    engine.runner.launch_first = lambda seqs, logits: launched.append(len(seqs)) or first(seqs, logits)
    try:
        sinks = [TokenSink() for _ in prompts]
        greedy = dict(temperature=0, ignore_eos=True)
        engine.submit(encoded[0], SamplingParams(max_tokens=24, stop_token_ids=[refs[0][0]], **greedy), sinks[0])
        engine.submit(encoded[1], SamplingParams(max_tokens=1, **greedy), sinks[1])
        engine.submit(encoded[2], SamplingParams(max_tokens=24, **greedy), sinks[2])
        deadline = time.monotonic() + 120
        while len(sinks[2].tokens) < 6 and not sinks[2].done.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.submit(encoded[3], SamplingParams(max_tokens=24, **greedy), sinks[3])
        assert all(sink.done.wait(120) for sink in sinks)
        assert sinks[0].tokens == [] and sinks[1].tokens == refs[1][:1]
        assert sinks[2].tokens == refs[2] and sinks[3].tokens == refs[3]
        assert sum(launched) == 4  # every first token went this way
        assert engine.stats.decode_tokens == 2 * 23  # the two long ones' tokens after their first
        assert engine.active() == 0
    finally:
        engine.shutdown()


def test_stream_body_cleans_up_once_even_when_never_started(loaded):
    """A response body the server drops before reading it (the client left before the first byte) still
    cancels its generation and runs its cleanup; one read to the end runs the cleanup exactly once."""
    import asyncio
    import gc
    import time

    from codellm.engine.core import Engine
    from codellm.engine.streams import AsyncStream, closing

    engine = Engine(loaded, slots=2)
    cleaned, tokens = [], []

    async def body_for(max_tokens):
        stream = AsyncStream().add(engine, [5, 6, 7], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

        async def events():
            async for out in stream:  # outputs that piled up arrive merged: count tokens, not chunks
                tokens.extend(out.token_ids)
                yield out.text.encode()

        return closing(events(), lambda: (stream.cancel(), cleaned.append(max_tokens)))

    async def main():
        body = await body_for(100_000)
        del body  # never started
        gc.collect()
        chunks = [c async for c in await body_for(5)]
        gc.collect()
        return chunks

    try:
        assert asyncio.run(main()) and len(tokens) == 5
        deadline = time.time() + 120
        while engine.active() and time.time() < deadline:
            time.sleep(0.05)
        assert engine.active() == 0 and engine.stats.cancelled == 1
        assert sorted(cleaned) == [5, 100_000]
    finally:
        engine.shutdown()


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 4)
    ids, _ = sample(logits, [SamplingParams(temperature=0)] * 4, [[]] * 4, [None] * 4)
    assert ids == [3, 3, 3, 3]
    ids, _ = sample(logits[:1], [SamplingParams(temperature=0, logit_bias={0: 10.0})], [[]], [None])
    assert ids == [0]
    ids, _ = sample(logits[:1], [SamplingParams(temperature=0, repetition_penalty=100.0)], [[3]], [None])
    assert ids == [2]
    ids, _ = sample(logits[:1], [SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=1.0)], [[3, 3]], [None])
    assert ids == [2]
    draws = set()
    for seed in range(30):  # top_k=2 only ever draws the two best tokens
        g = torch.Generator().manual_seed(seed)
        ids, _ = sample(logits[:1], [SamplingParams(temperature=5.0, top_k=2)], [[]], [g])
        draws.add(ids[0])
    assert draws == {2, 3}
    for seed in range(30):  # min_p drops tokens below a fraction of the best
        g = torch.Generator().manual_seed(seed)
        ids, _ = sample(logits[:1], [SamplingParams(temperature=1.0, min_p=0.5)], [[]], [g])
        assert ids[0] == 3
    ids, info = sample(logits[:1], [SamplingParams(temperature=0, logprobs=2)], [[]], [None])
    assert info[0].token_id == 3 and [t for t, _ in info[0].top] == [3, 2]
    assert abs(sum(torch.tensor([0.0, 1.0, 2.0, 3.0]).softmax(0)) - 1) < 1e-6


def test_adapter_served_unmerged_matches_peft(served_home, adapter_dir, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codellm.engine.loader import load
    from codellm.engine.core import Engine
    from codellm.registry import Registry
    from codellm.registry import manifest as mt

    reg = Registry(served_home)
    made = reg.get("tiny-lora").manifest
    base = reg.get("qwen2.5-coder:0.5b").manifest
    assert {l.filename for l in made.layers_of(mt.ADAPTER)} == {"adapter_config.json", "adapter_model.safetensors"}
    assert {l.digest for l in base.layers_of(mt.WEIGHTS)} <= {l.digest for l in made.layers}  # shares the base weights
    lm = load(reg, "tiny-lora", dtype="fp32")
    assert isinstance(lm.model, PeftModel) and lm.model.peft_config[lm.adapter].r == 4  # unmerged
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = lm.tokenizer("def fibonacci(n):\n", add_special_tokens=False)["input_ids"]
    ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    base_out = plain.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ref != base_out  # the adapter matters
    engine = Engine(lm, slots=2)
    try:
        sink = TokenSink()
        engine.submit(ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), sink)
        assert sink.done.wait(60)
        assert sink.tokens == ref
    finally:
        engine.shutdown()


def test_adapters_of_one_base_share_weights_and_batches(served_home, adapter_dir, adapter2_dir, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    reg = Registry(served_home)
    if not reg.exists("tiny-lora2"):
        create(reg, "tiny-lora2", Modelfile(from_="qwen2.5-coder:0.5b", adapters=[str(adapter2_dir)]))
    # the engine as a thread, on a GPU too: the test holds its step lock (the child-process engine serves adapters in
    # test_server, which runs every test against both)
    manager = ModelManager(reg, LoadOptions(dtype="fp32", keep_alive=None, engine_process=False))
    try:
        served = {name: manager.get(name) for name in ("tiny-lora", "tiny-lora2", "tiny-coder")}
        engines = {id(s.engine) for s in served.values()}
        assert len(engines) == 1 and len(manager._groups) == 1  # one copy of the weights, one engine
        engine = served["tiny-coder"].engine
        ids = served["tiny-coder"].lm.tokenizer("def fibonacci(n):\n", add_special_tokens=False)["input_ids"]

        def reference(adapter):
            model = AutoModelForCausalLM.from_pretrained(tiny_dir)
            if adapter:
                model = PeftModel.from_pretrained(model, adapter)
            out = model.eval().generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[0, len(ids):].tolist()

        refs = {"tiny-lora": reference(adapter_dir), "tiny-lora2": reference(adapter2_dir), "tiny-coder": reference(None)}
        assert len({tuple(r) for r in refs.values()}) == 3  # three different answers
        sinks = {name: TokenSink() for name in refs}
        before = engine.stats.max_batch
        with engine.step_lock:  # hold the loop so the three requests decode together
            for name in refs:
                engine.submit(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), sinks[name],
                              lm=served[name].lm)
        assert all(sink.done.wait(60) for sink in sinks.values())
        assert {name: sink.tokens for name, sink in sinks.items()} == refs
        assert engine.stats.max_batch >= 2 and engine.stats.max_batch >= before
        if engine.runner.graphs is not None:  # on a GPU the adapters ran inside the captured graphs (multilora)
            assert engine.runner.graphs_usable and engine.runner.graphs.lora is not None and engine.runner.graphs.graphs
            assert set(engine.runner.graphs.lora.index) == {served["tiny-lora"].lm.adapter, served["tiny-lora2"].lm.adapter}
    finally:
        manager.close()


def test_stacked_lora_matches_peft_mixed_batch(tiny_dir, adapter_dir, adapter2_dir):
    """The graph path's LoRA (adapters stacked per layer, a rank mask per row or token) gives PEFT's own mixed-batch
    logits: rows of the base model and of two adapters in one batch, and tokens of different adapters in one row
    (a packed prefill)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codellm.engine import multilora

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir, adapter_name="a").eval()
    model.load_adapter(adapter2_dir, adapter_name="b")
    rows = multilora.install(model, list(model.peft_config), torch.float32)
    assert rows is not None and rows.index == {"a": 1, "b": 2}
    inner = model.base_model.model  # what the graphs call: no adapter_names, PEFT's layers in place
    ids = torch.randint(300, 400, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, adapter_names=["__base__", "a", "b"]).logits
        with rows.active(torch.tensor([[0], [1], [2]])):
            got = inner(input_ids=ids).logits
        assert (ref[0] - ref[1]).abs().max() > 1e-2 and (ref[1] - ref[2]).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # per token: each position of one LoRA layer's input takes its own adapter
        layer = next(m for m in inner.modules() if hasattr(m, "_codellm_stack"))
        x = torch.randn(1, 6, layer.in_features)
        owners = [0, 1, 2, 2, 1, 0]
        with rows.active(torch.tensor([owners])):
            mixed = layer(x)
        for t, owner in enumerate(owners):
            alone = layer(x[:, t:t + 1], adapter_names=[["__base__", "a", "b"][owner]])
            torch.testing.assert_close(mixed[:, t:t + 1], alone, atol=1e-5, rtol=1e-5)
    assert rows.masks is None  # outside ``active``: PEFT's path again
    assert torch.equal(inner(input_ids=ids[:1]).logits, model(input_ids=ids[:1]).logits)


def test_memory_check_evicts_then_refuses(served_home, other_dirs):
    from codellm.engine import memory
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.errors import InsufficientMemory
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    reg = Registry(served_home)
    if not reg.exists("other-a"):
        create(reg, "other-a", Modelfile(from_=str(other_dirs[0])))
    options = LoadOptions(dtype="fp32", keep_alive=None, num_ctx=256, slots=2)
    one = memory.estimate(reg, reg.get("tiny-coder").manifest, options)
    assert one > reg.get("tiny-coder").manifest.layer("application/vnd.codellm.weights").size * 0.9
    options.memory_limit = int(one * 1.5)  # room for one copy of the weights, not two
    manager = ModelManager(reg, options)
    try:
        manager.get("tiny-coder")
        manager.get("tiny-lora")  # shares the weights: no new memory
        assert set(manager.loaded()) == {"tiny-coder:latest", "tiny-lora:latest"}
        manager.get("other-a")  # does not fit beside them: the idle ones make room
        assert set(manager.loaded()) == {"other-a:latest"}
        manager.options.memory_limit = one // 10
        manager.close()
        with pytest.raises(InsufficientMemory) as err:
            manager.get("tiny-coder")
        assert "requires more memory" in err.value.message and err.value.status == 507
    finally:
        manager.close()
    assert memory.parse_size("8GB") == 8 * 10**9 and memory.parse_size("512MiB") == 512 * 2**20


def test_a_default_kv_cache_too_big_for_the_memory_is_cut_to_what_fits(served_home):
    from codellm.engine import memory
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.engine.sampling import SamplingParams
    from codellm.registry import Registry

    reg = Registry(served_home)
    manifest = reg.get("tiny-coder").manifest
    options = LoadOptions(dtype="fp32", keep_alive=None, num_ctx=512, slots=64)  # 64 whole contexts by default
    whole = memory.footprint(reg, manifest, options)
    assert not whole.fitted and whole.kv > whole.weights
    options.memory_limit = int((whole.weights + whole.kv // 4) / memory.KV_SHARE)
    cut = memory.footprint(reg, manifest, options, capacity=options.memory_limit)
    assert cut.fitted and cut.weights == whole.weights and whole.kv // 8 < cut.kv <= whole.kv // 4
    options.kv_cache_memory = whole.kv  # asked for: taken as asked (and refused by the memory check)
    assert memory.footprint(reg, manifest, options, capacity=options.memory_limit) == whole
    options.kv_cache_memory = None
    manager = ModelManager(reg, options)
    try:
        served = manager.get("tiny-coder")  # loads with the smaller cache instead of refusing
        assert cut.kv <= served.engine.kv_bytes <= cut.kv * 1.01  # (and a scratch block)
        sink = TokenSink()
        served.engine.submit(served.lm.tokenizer.encode("def add(a, b):"),
                             SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), sink)
        assert sink.done.wait(120) and len(sink.tokens) == 8
    finally:
        manager.close()


def test_a_tensor_parallel_footprint_is_a_ranks_share(served_home):
    """Split over two ranks, each holds the embeddings whole and half of every layer and of the KV heads; on a CPU both
    ranks are in the one memory the server measures, so the model needs both shares there."""
    from codellm.engine import kvcache, loader, memory, sharding
    from codellm.engine.manager import LoadOptions
    from codellm.registry import Registry
    from codellm.registry import manifest as mt

    reg = Registry(served_home)
    entry, weights = loader.resolve(reg, "tiny-coder")
    options = LoadOptions(dtype="fp32", num_ctx=256, slots=4)
    whole = memory.footprint(reg, weights, options)
    options.tensor_parallel = 2
    split = memory.footprint(reg, weights, options)
    assert split.copies == 2 and split.kv == whole.kv // 2
    model_dir = reg.files_dir(weights, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{loader.weights_identity(weights)}")
    rank = sharding.load(model_dir, 0, 2, device=torch.device("cpu"), dtype=torch.float32,
                         attn_implementation=kvcache.register())
    held = sum(p.numel() * p.element_size() for p in {id(p): p for p in rank.parameters()}.values())
    assert abs(split.weights - held) < 0.1 * held and split.weights < 0.8 * whole.weights
    assert whole.total < split.total < 2 * whole.total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a GPU's free memory")
def test_a_default_kv_pool_is_cut_in_the_engine_to_what_the_device_has_free():
    """The server sizes a default pool from what was free before the engine loaded; the engine measures again, and
    leaves 1 - KV_SHARE of the device free besides (another process may have taken memory in between)."""
    from codellm.engine import memory

    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    per_token = 1 << 20
    asked = free // per_token  # all that is free: nothing left for activations
    got = memory.fit_on_device(device, asked, per_token, max_len=1024)
    room = (free - (1 - memory.KV_SHARE) * total) // per_token
    assert 1024 < got < asked and abs(got - room) <= room * 0.02 + 16
    assert memory.fit_on_device(device, got // 2, per_token, max_len=1024) == got // 2  # what fits stays
    held = torch.empty(int(free * 0.3), dtype=torch.uint8, device=device)  # another tenant of the device
    try:
        assert memory.fit_on_device(device, got, per_token, max_len=1024) < got * 0.75
    finally:
        del held
        torch.cuda.empty_cache()


@pytest.mark.parametrize("fmt,text,calls,content", [
    ("hermes", 'Let me check.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', [("f", {"x": 1})], "Let me check."),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"a": "b"}}</tool_call>',
     [("f", {}), ("g", {"a": "b"})], ""),
    ("hermes", "<tool_call>not json</tool_call>", [], "<tool_call>not json</tool_call>"),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"q": 2}}', [("f", {"q": 2})], ""),
    ("llama3", '{"name": "f", "parameters": {"q": 2}}; {"name": "g", "parameters": {}}', [("f", {"q": 2}), ("g", {})], ""),
    ("llama3", "Paris is sunny.", [], "Paris is sunny."),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"q": 2}}]', [("f", {"q": 2})], ""),
])
def test_tool_call_formats(fmt, text, calls, content):
    from codellm.engine.tools import ToolCallParser, parse_all, tool_format

    got_content, got = parse_all(text, fmt)
    assert [(c.name, c.arguments) for c in got] == calls and got_content == content
    parser = ToolCallParser(fmt)  # the same, fed one character at a time as a stream arrives
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert [(e[1].name, e[1].arguments) for e in events if e[0] == "call"] == calls
    assert "".join(e[1] for e in events if e[0] == "text") == content
    assert tool_format("... <tool_call> ...", None) == "hermes" and tool_format("<|python_tag|>", None) == "llama3"
    assert tool_format(None, "llama") == "llama3" and tool_format("[TOOL_CALLS]", None) == "mistral"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_pipe_read_on_the_event_loop_takes_messages_larger_than_the_socket_buffer(loop_kind):
    """An engine process's outputs are read on the server's loop; uvloop makes a watched descriptor non-blocking,
    which would break ``Connection.recv`` halfway through a large message (a step's outputs at 256 streams)."""
    import asyncio
    import multiprocessing

    from codellm.engine.remote import read_on

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    ours, theirs = multiprocessing.Pipe()
    messages = [("out", list(range(n)), "x" * n) for n in (10, 300_000, 5)]
    got: list = []
    done = loop.create_future()

    def pump():
        while ours.poll():
            got.append(ours.recv())
        if len(got) == len(messages) and not done.done():
            done.set_result(None)

    read_on(loop, ours, pump)
    sender = threading.Thread(target=lambda: [theirs.send(m) for m in messages])
    loop.call_later(0.05, sender.start)
    try:
        loop.run_until_complete(asyncio.wait_for(done, 30))
    finally:
        loop.close()
        sender.join()
    assert got == messages


def test_grammar_views_go_with_their_tokenizer():
    """The grammar engine's view of a tokenizer (a second or so to build for a large vocabulary) is kept while the
    tokenizer lives, and goes when the model that owned it is unloaded."""
    import gc

    from codellm.engine import grammar, tiny

    tok = tiny.build_tokenizer()
    view = grammar._tokenizer(tok, (1,))
    assert grammar._tokenizer(tok, (1,)) is view and grammar._tokenizer(tok, (1, 2)) is not view
    c = grammar.Constraint(tok, grammar.json_schema(None), "", (1,))
    assert not c.done
    held = len(grammar._TOKENIZERS)
    del tok, c
    gc.collect()
    assert len(grammar._TOKENIZERS) == held - 1


def test_side_by_side_attention_is_the_block_diagonal_one():
    """Packed runs attended side by side (padded to the longest, a pass each over its own keys) give what one
    block-diagonal causal mask over all of them gives: fresh prompts, runs continuing longer keys, a padding run,
    empty rows, grouped heads; a long run beside short ones keeps the one mask."""
    import itertools

    import torch

    from codellm.engine import kvcache

    torch.manual_seed(0)

    def both(cu, cu_k, hq=4, hkv=2, d=8, pooled=True):
        """(layout, side by side, one mask): the keys read from a pool (runs continuing cached prefixes, through an
        identity pool) or, for fresh prompts, the step's own."""
        n, nk = cu[-1], cu_k[-1]
        q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, nk, d), torch.randn(1, hkv, nk, d)
        pool = type("Pool", (), {"k": [k[0].transpose(0, 1)], "v": [v[0].transpose(0, 1)]})()

        def ctx():
            return kvcache.StepContext(pool, torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long),
                                       max(b - a for a, b in zip(cu, cu[1:])), cu=torch.tensor(cu),
                                       kv_index=torch.arange(nk) if pooled else None,
                                       cu_k=torch.tensor(cu_k) if pooled else None)
        one_mask = ctx()
        one_mask.memo["segments"] = ()  # no layout: the one mask
        return (kvcache.segments(cu, cu_k, n, nk), kvcache._packed_attention(ctx(), 0, q, k, v, 0.3),
                kvcache._packed_attention(one_mask, 0, q, k, v, 0.3))

    # checks of 1-6 tokens continuing 9-40 keys, a padding run of 3 queries with one key, two empty rows
    queries, keys = [6, 1, 5, 6, 2, 6, 4, 6, 3], [40, 9, 26, 31, 12, 33, 38, 25, 1]
    cu = [0, *itertools.accumulate(queries), sum(queries), sum(queries)]
    cu_k = [0, *itertools.accumulate(keys), sum(keys), sum(keys)]
    layout, side, ref = both(cu, cu_k)
    assert layout is not None
    torch.testing.assert_close(side, ref, rtol=1e-5, atol=1e-5)
    fresh = [0, *itertools.accumulate([5, 4, 7, 1, 6, 5, 7, 3])]  # fresh prompts: each run is its own keys
    layout, side, ref = both(fresh, fresh, hq=2, hkv=2, pooled=False)
    assert layout is not None
    torch.testing.assert_close(side, ref, rtol=1e-5, atol=1e-5)
    assert kvcache.segments([0, 500, 502, 504], [0, 500, 502, 504], 504, 504) is None  # a long prompt beside two short


def test_the_default_prefill_budget_follows_the_model_size():
    """A GPU step prefills about as much compute whatever the model: 8192 tokens of a 1B model, 2048 of an 8B; a
    4-bit weight counts as the parameters it holds."""
    from codellm.engine.core import default_prefill_chunk, parameter_count

    assert [default_prefill_chunk(True, n) for n in (135_000_000, 1_240_000_000, 3_200_000_000, 8_000_000_000,
                                                     70_000_000_000)] == [8192, 8192, 4096, 2048, 2048]
    assert default_prefill_chunk(False, 8_000_000_000) == 512
    packed = torch.nn.Linear(8, 4, bias=False)
    packed.weight = torch.nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)
    assert parameter_count(packed) == 32


def test_the_step_log_has_a_line_per_step(loaded, tmp_path, monkeypatch):
    """CODELLM_STEP_LOG: each step's admissions, prompt tokens and decoded rows, on the clock every process shares."""
    import json

    from codellm.engine.core import Engine

    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("CODELLM_STEP_LOG", str(path))
    engine = Engine(loaded, slots=4, prefill_chunk=8)
    start = time.perf_counter()
    try:
        sinks = [TokenSink() for _ in range(3)]
        prompts = [list(range(300, 300 + n)) for n in (5, 12, 20)]
        for prompt, sink in zip(prompts, sinks):
            engine.submit(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), sink)
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        engine.shutdown()
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(steps) >= engine.stats.steps  # (every decode step, and steps that only prefilled)
    assert sum(s["admitted"] for s in steps) == 3
    assert sum(s["prefill_tokens"] for s in steps) == 5 + 12 + 20
    assert max(s["prefill_tokens"] for s in steps) <= 8  # the budget, chunked
    assert sum(s["decoded"] for s in steps) >= 3 * 5  # (each choice's first token comes from its prefill)
    assert all(s["model"] == loaded.name and s["t"] >= start and s["prefill_ms"] >= 0 for s in steps)
