"""CPU sparse-MoE experts: pagedserve's sorted per-expert matmuls (model/moe.py)
against transformers' expert loop (Qwen3MoeExperts) on the same weights and routing.

Shape: a scaled-down Qwen3-30B-A3B layer (hidden 1024, expert intermediate 384,
64 experts, top-8), fp32, for 1, 16 and 256 tokens (a decode step to a prefill chunk).
Each figure is the median of --repeats timed calls after two warm-ups.

    python benchmarks/moe_cpu.py --threads 1   (docs/models.md; --out FILE writes JSON)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import environment, write_json


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from pagedserve.model.moe import Experts, route

    hidden, inter, experts, top_k = 1024, 384, 64, 8
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, hidden_act="silu")
    torch.manual_seed(0)
    hf = Qwen3MoeExperts(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    ours = Experts(experts, hidden, inter, "silu")
    ours.load_state_dict(hf.state_dict())
    rows = []
    with torch.inference_mode():
        for n in (1, 16, 256):
            x = torch.randn(n, hidden)
            w, ids = route(torch.randn(n, experts), top_k, True, torch.float32)
            a = ours(x, w, ids)
            b = hf(x, ids, w)
            assert (a - b).abs().max().item() < 1e-4
            t_ours = _time(lambda: ours(x, w, ids), args.repeats)
            t_hf = _time(lambda: hf(x, ids, w), args.repeats)
            rows.append({"tokens": n, "pagedserve_ms": t_ours * 1e3, "transformers_ms": t_hf * 1e3,
                         "speedup": t_hf / t_ours})
            print(f"{n:4d} tokens: pagedserve {t_ours * 1e3:7.2f} ms, transformers "
                  f"{t_hf * 1e3:7.2f} ms ({t_hf / t_ours:.2f}x)")
    write_json(args.out, {"meta": environment(threads=args.threads), "rows": rows})


if __name__ == "__main__":
    main()
