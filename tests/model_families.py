"""Tiny random-weight checkpoints of every supported family, built from transformers'
own config classes and saved as safetensors directories (shared by the CPU, serve and
GPU tests)."""

import torch

FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "gemma3", "phi3", "mistral_window"]
WINDOW = 8  # sliding window of the windowed families: far shorter than the test sequences
# Phi-3's LongRoPE original context: prompts are longer (see model/rope.py for why)
PHI3_ORIGINAL_CONTEXT = 16

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               eos_token_id=2, bos_token_id=1)


def greedy_prompts() -> list[list[int]]:
    """The 8 prompts of the greedy parity tests: longer than the window and than Phi-3's
    original context (LongRoPE's long factors), of repeated and distinct lengths."""
    g = torch.Generator().manual_seed(7)
    lens = [17, 23, 17, 31, 40, 19, 23, 28]
    assert min(lens) > max(PHI3_ORIGINAL_CONTEXT, WINDOW)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lens]


def tiny_config(kind: str, head_dim: int = 16, **overrides):
    """`overrides`: config fields to change (e.g. num_key_value_heads). `head_dim`: 16 on
    CPU; the GPU tests take 64, a size the CUDA kernels are built for (the hidden size
    is always 4 heads of it)."""
    cfg = _tiny_config(kind, head_dim)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _tiny_config(kind: str, head_dim: int):
    import transformers as tf

    common = dict(_COMMON, hidden_size=4 * head_dim)
    if kind == "qwen3":  # per-head q/k norms, tied embeddings
        return tf.Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=True)
    if kind == "qwen3_moe":  # layer 1 dense (mlp_only_layers), 8 experts, top-2 renormalised
        return tf.Qwen3MoeConfig(**common, head_dim=head_dim, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
    if kind == "mixtral":  # 4 experts, top-2, no window
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)
    if kind == "gemma3":  # local, local, global, local; a linearly scaled global RoPE
        common = dict(common, num_hidden_layers=4)
        return tf.Gemma3TextConfig(
            **common, head_dim=head_dim, sliding_window=WINDOW, query_pre_attn_scalar=24,
            final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh",
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 1000000.0}})
    if kind == "phi3":  # fused qkv/gate_up, partial rotary (as Phi-4-mini), LongRoPE
        rot = int(head_dim * 0.75)
        return tf.Phi3Config(**common, tie_word_embeddings=True, pad_token_id=0, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(rot // 2)],
            "long_factor": [1.5 + 0.5 * i for i in range(rot // 2)],
            "original_max_position_embeddings": PHI3_ORIGINAL_CONTEXT})
    if kind == "mistral_window":  # every layer windowed
        return tf.MistralConfig(**common, sliding_window=WINDOW, head_dim=head_dim)
    raise AssertionError(kind)


def save_tiny(kind: str, path, dtype=torch.float32, overrides: dict | None = None,
              head_dim: int = 16, **save_kwargs):
    """Random weights (norms and biases too, so a dropped or mis-offset one shows),
    saved with save_pretrained; returns the float32 transformers model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(tiny_config(kind, head_dim, **(overrides or {}))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.normal_(0, 0.3 if "norm" in name else 0.5)
            elif "mlp.gate.weight" in name or "block_sparse_moe.gate" in name:
                p.normal_(0, 0.5)  # confident routers: top-k is far from ties
    hf.to(dtype).save_pretrained(path, **save_kwargs)
    return hf.float()
