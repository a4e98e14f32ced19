"""What runs a step on a device: the model runner (KV cache tensors, flat inputs, the
forward pass), decode CUDA graphs and the sampler. It takes a scheduled step
(pagedserve.engine.batch, the one contract between the two) and makes no scheduling
decisions; the engine (pagedserve.engine) decides what runs.
"""
