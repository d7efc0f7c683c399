"""QLoRA training and adapter merging (issue #4: not built yet)."""
