"""Decode attention alone on a GPU: SDPA (mem-efficient, masked to the key bucket) against the split-KV kernel
at several programs per SM, 16 calls per captured graph (one per layer), rows of 128-384 keys.

    python benchmarks/decode_attention_bench.py
"""

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codellm.engine import decode_attention as da, kvcache  # noqa: E402

HQ, HKV, D, CACHE = 32, 8, 64, 400  # Llama-3.2-1B's heads; a 400-position cache as serve_bench's num_ctx
PAGE = 16  # the engine's KV block size


def timed(fn, reps: int = 50) -> float:
    """Microseconds per call of ``fn``, 16 calls captured in one graph and replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(16):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 16 * 1000


def main() -> None:
    torch.manual_seed(0)
    random.seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    for rows in (1, 16, 64, 256):
        kc = torch.randn(rows + 1, HKV, CACHE + 1, D, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        lengths = [random.randint(128, 384) for _ in range(rows)]
        lens = torch.tensor(lengths, device=dev, dtype=torch.int32)
        q = torch.randn(rows, 1, HQ, D, device=dev, dtype=dt).transpose(1, 2)
        kv = CACHE + 1 if max(lengths) > 256 else 256  # the key bucket SDPA's graph would use
        mask = (torch.arange(kv, device=dev).view(1, 1, 1, -1) < lens.view(-1, 1, 1, 1)).repeat(1, 1, HQ // HKV, 1)

        def sdpa():
            with kvcache.attention_backends(dev):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(rows, HKV, HQ // HKV, D), kc[:rows, :, :kv], vc[:rows, :, :kv], attn_mask=mask)

        # the same keys as the engine's paged pool holds them: token-major blocks of PAGE, row b's blocks in its table
        pages = -(-(CACHE + 1) // PAGE)

        def paged(cache):
            padded = torch.zeros(rows + 1, HKV, pages * PAGE, D, device=dev, dtype=dt)
            padded[:, :, :CACHE + 1] = cache
            return padded.transpose(1, 2).reshape(-1, HKV, D).contiguous()

        kp, vp = paged(kc), paged(vc)
        table = torch.arange((rows + 1) * pages, device=dev, dtype=torch.int32).view(rows + 1, pages)

        def kernel():
            return da.decode_attention(q[:, :, 0], kp, vp, table, lens, D ** -0.5, PAGE)

        results = {"sdpa": timed(sdpa)}
        for per_sm in (2, 4, 8, 16, 32):
            da.PROGRAMS_PER_SM = per_sm
            results[f"kernel, {per_sm} programs/SM ({da.splits_for(rows, HKV, dev)} pieces)"] = timed(kernel)
        diff = (sdpa().reshape(rows, HQ, D).float() - kernel().float()).abs().max().item()
        print(f"batch {rows}: " + ", ".join(f"{k} {v:.1f} us" for k, v in results.items()) + f"; max diff {diff:.3g}",
              flush=True)


if __name__ == "__main__":
    main()
