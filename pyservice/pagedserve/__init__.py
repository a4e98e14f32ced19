"""pagedserve: LLM serving on PagedAttention.

    from pagedserve import LLM, SamplingParams
    llm = LLM()
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Names load on first use, so `import pagedserve.v1` or the CLI's --help do not pull
in torch and transformers.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# torch's CPU allocator backs every allocation of 2 MB or more (weights, the KV pool,
# activations) with transparent huge pages when THP_MEM_ALLOC_ENABLE=1 is set before
# its first allocation. The CPU decode kernel reads the pool in 2-4 KB blocks scattered
# over it, and projections stream their weights: with 4 KB pages both miss the TLB at
# every page (a two-level walk in a VM) and the prefetchers stop at every page edge.
# Measured 6-13% end to end on one thread (docs/throughput_cpu.md). Only when pagedserve
# is imported before torch (the start-up line says whether it took); an explicit value
# is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_EXPORTS = {
    "LLM": "pagedserve.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "EngineConfig": "pagedserve.config",
    "SamplingParams": "pagedserve.sampling_params",
    "RequestOutput": "pagedserve.outputs",
    "CompletionOutput": "pagedserve.outputs",
    "RequestMetrics": "pagedserve.outputs",
    "RequestOutputKind": "pagedserve.outputs",
    "EngineStats": "pagedserve.engine.stats",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.engine.stats import EngineStats
    from pagedserve.llm import LLM
    from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
    from pagedserve.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
