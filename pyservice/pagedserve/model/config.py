"""The model shape the runner needs, read from a Hugging Face config.

One normalised dataclass so the rest of the code never looks at architecture-specific
config attributes (which also differ between transformers 4.x and 5.x for RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# architecture name -> whether q/k/v projections carry a bias regardless of the config
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    hf_config: Any = field(default=None, repr=False)  # kept for RoPE scaling functions

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        archs = list(getattr(hf, "architectures", None) or [])
        if not archs:  # GGUF configs carry model_type only
            archs = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}.get(hf.model_type, hf.model_type)]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch} (supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)})")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {hf.hidden_act} for {arch} (only silu)")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        theta, rope_type = _rope(hf)
        eos = hf.eos_token_id
        eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        forced_bias = SUPPORTED_ARCHITECTURES[arch]
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=theta,
            rope_type=rope_type,
            max_position_embeddings=_max_len(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=forced_bias or attention_bias,
            o_bias=attention_bias and not forced_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
            hf_config=hf,
        )

    def kv_block_bytes(self, block_size: int, dtype_size: int) -> int:
        """Bytes of one KV block across all layers (keys and values)."""
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_size


def rope_parameters(hf: Any) -> dict:
    """RoPE settings as one dict: transformers 5 keeps them in `rope_parameters`,
    4.x in `rope_theta` + `rope_scaling`."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _rope(hf: Any) -> tuple[float, str]:
    params = rope_parameters(hf)
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {params['rope_type']} "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return float(params["rope_theta"]), params["rope_type"]


def _max_len(hf: Any) -> int:
    n = hf.max_position_embeddings
    # Attention here is full causal: a sliding-window model is exact only up to its window.
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True):
        n = min(n, window)
    return n
