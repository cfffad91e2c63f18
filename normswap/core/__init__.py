"""The dependency-free core: the Plan data model, the kinds of layers, the finder's model graph, the probe
input and the torch.distributed helpers. Nothing here imports another normswap package (errors aside)."""
