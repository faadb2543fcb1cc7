"""Expert parallelism over torch.distributed: the layer's experts sharded over processes, all-to-all
dispatch and combine, routing and training with torchrun."""
