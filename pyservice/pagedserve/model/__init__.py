"""The Llama-family decoder over flat token batches, its config and its loader."""

from pagedserve.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]
