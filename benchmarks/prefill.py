"""Prefill over the paged KV cache on the GPU, against baselines measured in the
same run.

Llama-3-8B attention heads (32 query, 8 KV, head 128, bf16, block 16, scattered
block ids). Each case packs the new tokens of several sequences (varlen) that
attend causally to their cached context and to themselves. Side by side:

* the tensor-core kernel (cuda/prefill_tc.cuh, what fp16/bf16 use),
* the CUDA-core kernel (cuda/prefill.cuh, fp32's and older GPUs'),
* FlashAttention-2 through torch (`aten._flash_attention_forward`, varlen, causal
  aligned bottom-right) on the same K/V laid out contiguously: the floor a paged
  kernel of this kind is measured against.

Time is the median of CUDA-event timings; TFLOP/s counts 4 * head_size FLOPs per
(query head, attended key) pair.

    python benchmarks/prefill.py --out docs/prefill_h100.json [--loader compiled|cupy]
"""

from __future__ import annotations

import argparse

import torch

from harness import device_median, environment, write_json
from pagedserve import ops

HQ, HKV, D, BS = 32, 8, 128, 16

# (name, sequences, cached tokens per sequence, new tokens per sequence)
CASES = [
    ("prefix hit", 8, 3072, 1024),
    ("fresh prompts", 4, 0, 4096),
    ("long-prompt chunk", 1, 14336, 2048),
    ("short prompts", 64, 256, 256),
]


def attended_pairs(cached: int, new: int) -> int:
    """Keys attended by the new tokens of one sequence: token i sees cached + i + 1."""
    return new * cached + new * (new + 1) // 2


def prefill_case(name: str, seqs: int, cached: int, new: int, iters: int, gen: torch.Generator) -> dict:
    ctx = cached + new
    nb = -(-ctx // BS)
    kc, vc = ops.allocate_kv_cache(seqs * nb, BS, HKV, D, torch.bfloat16, "cuda")
    kc.normal_(generator=gen)
    vc.normal_(generator=gen)
    bt = torch.randperm(seqs * nb, device="cuda", generator=gen).view(seqs, nb).to(torch.int32)
    q = torch.randn(seqs * new, HQ, D, device="cuda", generator=gen).bfloat16()
    qsl = torch.arange(0, seqs * new + 1, new, dtype=torch.int32, device="cuda")
    ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    flops = 4 * D * HQ * seqs * attended_pairs(cached, new)

    def paged(tc: bool, out: torch.Tensor):
        with ops.cuda_device(q.device).override(prefill_tensor_cores=tc):
            return device_median(lambda: ops.prefill_attention(q, kc, vc, bt, qsl, ctx_lens, scale, out=out), iters)

    # the same K/V, contiguous per sequence ([tokens, heads, D], sequence after sequence)
    def contiguous(cache):
        return cache[bt.long()].permute(0, 1, 3, 2, 4).reshape(seqs, nb * BS, HKV, D)[:, :ctx].reshape(-1, HKV, D)

    k_c, v_c = contiguous(kc), contiguous(vc)
    cu_k = torch.arange(0, seqs * ctx + 1, ctx, dtype=torch.int32, device="cuda")

    def flash():
        return torch.ops.aten._flash_attention_forward(q, k_c, v_c, qsl, cu_k, new, ctx, 0.0, True, False,
                                                      scale=scale)[0]

    ref = flash()
    out_tc, out_cc = torch.empty_like(q), torch.empty_like(q)
    t_tc = paged(True, out_tc)
    t_cc = paged(False, out_cc)
    t_fa = device_median(flash, iters)
    return {
        "case": name, "sequences": seqs, "cached": cached, "new": new, "flops": flops,
        "tensor_core_s": t_tc, "cuda_core_s": t_cc, "flash_contiguous_s": t_fa,
        "tensor_core_flops": flops / t_tc, "cuda_core_flops": flops / t_cc, "flash_flops": flops / t_fa,
        "max_abs_diff_tc_vs_flash": float((out_tc.float() - ref.float()).abs().max()),
        "max_abs_diff_cc_vs_flash": float((out_cc.float() - ref.float()).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--loader", choices=["compiled", "cupy"], default=None)
    args = ap.parse_args()
    ops.set_loader(args.loader)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"env": environment(loader=ops.get_loader().name), "prefill": []}
    for case in CASES:
        result["prefill"].append(prefill_case(*case, args.iters, gen))
        torch.cuda.empty_cache()
    write_json(args.out, result)

    tf = 1e12
    print(f"{result['env']['gpu']}  torch {torch.__version__}  loader {result['env']['loader']}")
    print(f"{'case':>18} {'seqs x (cached+new)':>20} {'tc us':>8} {'TFLOP/s':>7} {'cuda-core us':>12} "
          f"{'flash us':>9} {'tc/flash':>8} {'tc vs cc':>8}")
    for r in result["prefill"]:
        shape = f"{r['sequences']} x ({r['cached']}+{r['new']})"
        print(f"{r['case']:>18} {shape:>20} {r['tensor_core_s'] * 1e6:8.1f} {r['tensor_core_flops'] / tf:7.1f} "
              f"{r['cuda_core_s'] * 1e6:12.1f} {r['flash_contiguous_s'] * 1e6:9.1f} "
              f"{r['flash_contiguous_s'] / r['tensor_core_s']:8.2f} {r['cuda_core_s'] / r['tensor_core_s']:7.1f}x")


if __name__ == "__main__":
    main()
