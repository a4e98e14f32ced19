"""The decoders (Llama family, Gemma 3; see registry.py) over flat token batches,
their normalised config and their loader."""

from pagedserve.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]
