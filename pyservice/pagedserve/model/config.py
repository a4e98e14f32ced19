"""The model shape the runner needs, read from a Hugging Face config.

One normalised dataclass so the rest of the code never looks at architecture-specific
config attributes (which also differ between transformers 4.x and 5.x for RoPE). Every
family's peculiarity becomes a plain field here (per-head q/k norms, a sliding window
per layer, MoE sizes, Gemma's scales), and the decoder reads only these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.model.registry import SUPPORTED_ARCHITECTURES, architecture_of

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_TYPES", "rope_parameters"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# architectures whose q/k/v projections carry a bias whatever attention_bias says
_FORCED_QKV_BIAS = {"Qwen2ForCausalLM"}
_QK_NORM = {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"}
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


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
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    # Per layer: keys a query may see are those less than this many positions back
    # (transformers' `q - k < window`); None is full causal attention.
    layer_windows: tuple[int | None, ...] = ()
    # Per layer: the key of its RoPE settings ("full_attention" / "sliding_attention")
    # where a model keeps several (Gemma 3), else None.
    layer_rope: tuple[str | None, ...] = ()
    rotary_dim: int = 0  # leading dims of each head that RoPE rotates (partial rotary)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    # Sparse MoE (0 experts: dense); the layers whose MLP is sparse
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_weights_in_model_dtype: bool = True  # Qwen3-MoE rounds routing weights, Mixtral not
    moe_layers: tuple[bool, ...] = ()
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)
    final_logit_softcapping: float | None = None
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (offset + w): folded at load

    def __post_init__(self):
        self.layer_windows = tuple(self.layer_windows) or (None,) * self.num_layers
        self.layer_rope = tuple(self.layer_rope) or (None,) * self.num_layers
        self.moe_layers = tuple(self.moe_layers) or (False,) * self.num_layers
        self.rotary_dim = self.rotary_dim or self.head_dim
        for name in ("layer_windows", "layer_rope", "moe_layers"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for "
                                 f"{self.num_layers} layers")
        if any(w is not None and w < 1 for w in self.layer_windows):
            raise ValueError(f"sliding windows must be >= 1, got {self.layer_windows}")

    @property
    def sliding_window_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.layer_windows) if w is not None]

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        arch = architecture_of(hf)
        act = getattr(hf, "hidden_act", None) or getattr(hf, "hidden_activation", None) or "silu"
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act} for {arch} "
                             f"(supported: {', '.join(_ACTIVATIONS)})")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        layers = hf.num_hidden_layers
        layer_rope = _layer_rope(hf, layers)
        theta, rope_type, partial = _rope(hf, layer_rope)
        eos = hf.eos_token_id
        eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        forced_bias = arch in _FORCED_QKV_BIAS
        kw: dict = {}
        if arch == "Gemma3ForCausalLM":
            if getattr(hf, "attn_logit_softcapping", None) is not None:
                raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
            kw.update(attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
                      embed_scale=float(hf.hidden_size) ** 0.5, norm_offset=1.0,
                      final_logit_softcapping=getattr(hf, "final_logit_softcapping", None))
        kw.update(_moe(hf, arch, layers))
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=theta,
            rope_type=rope_type,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=forced_bias or attention_bias,
            o_bias=attention_bias and not forced_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
            hf_config=hf,
            hidden_act=act,
            qk_norm=arch in _QK_NORM,
            layer_windows=_layer_windows(hf, layers),
            layer_rope=layer_rope,
            rotary_dim=int(head_dim * partial),
            **kw,
        )

    def kv_block_bytes(self, block_size: int, dtype_size: int) -> int:
        """Bytes of one KV block across all layers (keys and values)."""
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_size


def rope_parameters(hf: Any, layer_type: str | None = None) -> dict:
    """RoPE settings as one dict: transformers 5 keeps them in `rope_parameters` (per
    layer type for Gemma 3), 4.x in `rope_theta` + `rope_scaling`."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and not params.get("rope_type") and layer_type is None:
        params.update(scaling)
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "su":  # the early name of LongRoPE in Phi-3 configs
        params["rope_type"] = "longrope"
    return params


def _layer_rope(hf: Any, layers: int) -> tuple[str | None, ...]:
    params = getattr(hf, "rope_parameters", None) or {}
    types = getattr(hf, "layer_types", None)
    if types and all(t in params for t in set(types)):
        return tuple(types)
    return (None,) * layers


def _layer_windows(hf: Any, layers: int) -> tuple[int | None, ...]:
    """The window of each layer, as transformers masks it: layers typed
    "sliding_attention" where the config lists layer types (Gemma 3, Qwen2/3 with
    use_sliding_window), else every layer when the config sets a window (Mistral,
    Mixtral, Phi-3)."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" and window else None for t in types)
    if window and getattr(hf, "use_sliding_window", True):
        return (int(window),) * layers
    return (None,) * layers


def _rope(hf: Any, layer_rope: tuple[str | None, ...]) -> tuple[float, str, float]:
    """(theta, type, partial rotary factor) of the model's global-attention RoPE; every
    layer type's RoPE type is checked."""
    for lt in sorted({t for t in layer_rope if t is not None}) or [None]:
        params = rope_parameters(hf, lt)
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {params['rope_type']} "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    typed = sorted({t for t in layer_rope if t is not None})
    main = rope_parameters(hf, ("full_attention" if "full_attention" in typed else typed[0])
                           if typed else None)
    partial = float(main.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)))
    return float(main["rope_theta"]), main["rope_type"], partial


def _moe(hf: Any, arch: str, layers: int) -> dict:
    if arch == "MixtralForCausalLM":
        return dict(num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.intermediate_size, norm_topk_prob=True,
                    moe_weights_in_model_dtype=False, moe_layers=(True,) * layers)
    if arch == "Qwen3MoeForCausalLM":
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        sparse = tuple(i not in dense and hf.num_experts > 0 and (i + 1) % step == 0
                       for i in range(layers))
        return dict(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.moe_intermediate_size,
                    norm_topk_prob=bool(hf.norm_topk_prob), moe_layers=sparse)
    return {}
