"""pagedserve: LLM serving on PagedAttention.

    from pagedserve import LLM, SamplingParams
    llm = LLM()
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Names load on first use, so `import pagedserve.v1` or the CLI's --help do not pull
in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
