"""Inference engine: loading, prompts, sampling, slot KV cache, continuous batching. No HTTP here."""
