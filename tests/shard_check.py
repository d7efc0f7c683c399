"""One rank of a tensor-parallel check (``test_sharded_ranks_match_the_whole_model``), in a process of its own:
``python tests/shard_check.py MODEL_DIR RANK WORLD INIT_URL OUT`` loads this rank's share of the model (as a served
rank does), joins the others over gloo and writes, for one prompt, the greedy tokens of ``generate`` and the last
logits through the engine's paged attention with fused projections (safetensors at OUT)."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoConfig

from codellm.engine import fusion, kvcache, sharding
from codellm.engine.runner import kv_shape

PROMPT = [5, 17, 99, 3, 42, 7, 311, 12]


def main(model_dir: str, rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = sharding.load(model_dir, rank, world, device=torch.device("cpu"), dtype=torch.float32,
                          attn_implementation=kvcache.register())
    split = sharding.plan(AutoConfig.from_pretrained(model_dir), world)
    with torch.inference_mode():
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(PROMPT):]
        fusion.fuse(model)
        layers, kv_heads, head_dim = kv_shape(model)
        assert kv_heads == split.kv_heads  # the cache holds this rank's heads only
        cache = kvcache.PagedCache(layers=layers, blocks=8, block_size=4, rows=2, kv_heads=kv_heads,
                                   head_dim=head_dim, max_len=32, dtype=torch.float32, device="cpu")
        n = len(PROMPT)
        with kvcache.use(kvcache.step_context(cache, [[0, 1, 2]], torch.arange(n).unsqueeze(0))):
            logits = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0, -1]
    save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
