"""Linear layers on CPU through oneDNN with weights packed once, at load.

`F.linear` on a 16-bit CPU tensor reaches oneDNN's matmul, which lays the weight out
in its blocked format again at every call: for a decode step of a few dozen rows that
reorder is a good part of the projection. Packing each weight once into the layout
oneDNN's kernels read (the packing torch's own freezing pass uses for Inductor) leaves
only the multiply: 5-25% faster per projection at the SmolLM2 shapes on an AVX512-BF16
CPU (benchmarks/profile_cpu.py, docs/throughput_cpu.md). The result is the same
arithmetic as `F.linear` (same kernel family, fp32 accumulation).

float32 is packed too: `F.linear` on float32 is MKL's sgemm, which on CPUs other than
Intel's runs a generic path; oneDNN's packed float32 kernels were 1.2-2x faster at
these shapes on an AMD EPYC (docs/throughput_cpu.md). The sums are the same up to
float32 rounding order (about 1e-6 relative). The packed copy sits beside the weight
(it is not a parameter): the original stays for state dicts and tied embeddings.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def packing_supported(dtype: torch.dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float32) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed layout of a [out, in] weight, for any number of rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_model(model: nn.Module) -> int:
    """Packs the weight of every module with a `packed_weight` slot (layers.Linear) that
    holds a CPU bfloat16 or float32 weight; returns how many. Call after the weights are loaded."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "packed_weight"):
            continue
        w = module.weight
        if w.device.type != "cpu" or not packing_supported(w.dtype):
            continue
        try:
            module.packed_weight = pack_weight(w)
        except RuntimeError as e:  # an op missing from this torch build: keep F.linear
            log.warning("oneDNN weight packing unavailable (%s); using F.linear", e)
            return count
        count += 1
    return count
