"""Which model class serves which checkpoint: the `architectures` name of config.json
mapped to a class, imported only when a model of that family is built.

Several names share one class: the Llama decoder takes per-head q/k norms (Qwen3),
fused checkpoint projections (Phi-3), sparse MoE blocks (Qwen3-MoE, Mixtral) and
sliding windows (Mistral) from the normalised `ModelConfig`, so a family is a row here
plus what its config says, not a copy of the decoder.
"""

from __future__ import annotations

import importlib

# architecture name -> (module, class)
_MODELS = {
    "LlamaForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "Gemma3ForCausalLM": ("pagedserve.model.gemma3", "Gemma3ForCausalLM"),
}

# GGUF configs carry a model_type only
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def architecture_of(hf) -> str:
    """The checkpoint's architecture name; ValueError naming it when unsupported."""
    archs = list(getattr(hf, "architectures", None) or [])
    arch = archs[0] if archs else _BY_MODEL_TYPE.get(hf.model_type, hf.model_type)
    if arch not in _MODELS:
        raise ValueError(f"unsupported architecture {arch} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def model_class(architecture: str):
    """The nn.Module class that serves `architecture`."""
    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
