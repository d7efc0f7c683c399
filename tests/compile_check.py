"""The compiled training layers against the eager ones, in a process of its own (``test_compiled_layers_match_eager``):
``python tests/compile_check.py MODEL_DIR ALPACA_FILE`` exits 0 and says so when loss and adapter gradients agree."""
import sys

import torch
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from codellm.trainer.data import load_examples
from codellm.trainer.loop import TrainConfig, load_for_training
from codellm.trainer.loss import CausalLMLoss, collate
from codellm.trainer.prompts import encode


def run(model_dir, batch, compile):
    torch.manual_seed(0)
    model = load_for_training(model_dir, TrainConfig(r=4, alpha=8, dropout=0.0, compile=compile), torch.device("cpu"), None)
    with torch.no_grad():  # B starts at zero: make the adapters contribute
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.train()
    loss = CausalLMLoss(model)(*batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def main(model_dir: str, data: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _, _ = load_examples(data)
    batch = collate([encode(e, tok, "chat", 256)[:2] for e in examples], tok.pad_token_id)
    ref_loss, ref_grads = run(model_dir, batch, False)
    loss, grads = run(model_dir, batch, True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, {k: dict(v) for k, v in counters.items()}  # compiled, not silently eager
    print(f"compiled graphs: {graphs}")
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:  # fp32 sums in another order: an element near zero is off by the rounding of the largest
        ref = ref_grads[name]
        torch.testing.assert_close(grads[name], ref, rtol=1e-3, atol=1e-5 * max(1.0, ref.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    print(f"same loss and gradients: {loss:.6f} vs {ref_loss:.6f}, {len(grads)} adapter tensors")


if __name__ == "__main__":
    main(*sys.argv[1:3])
