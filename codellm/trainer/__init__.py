"""QLoRA training and adapter merging: data, loss masking, packing, the training loop, merge, plots."""
