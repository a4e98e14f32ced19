"""KV blocks in use with and without sharing: parallel sampling and beam search.

The engine's own scheduler (pagedserve.engine.scheduler, with its beam search module)
drives the native BlockManager over a request trace; a synthetic runner stands in for
the model, so no weights and no tensors are involved and long traces run in seconds:
 - parallel sampling (n samples): each sample draws a random token per step; the n
   samples fork from the prompt after its prefill, as in the engine;
 - beam search (width k): each beam's next-token log-probabilities come from a
   synthetic language model, log_softmax(SIGMA * z) over VOCAB tokens with z ~ N(0, 1)
   seeded by the beam's recent context, so beams win and lose, are forked and freed
   exactly as the engine does for a real model (transformers' selection rules).
Output lengths are fixed per request (ignore_eos, max_tokens = the drawn length), so
every sample or beam runs that long.

Blocks in use WITH sharing = the block manager's used GPU blocks after each step.
WITHOUT sharing = the sum over live sequences of ceil(tokens / block_size): what the
same sequences hold when each keeps a private copy of its KV (a fork copies the
prompt, or the beam's history). Savings = 1 - sum(with) / sum(without) over all steps
(time-weighted: an average over the whole trace). The pool is large
enough that nothing is ever preempted, and prefix caching is off, so the only sharing
is within a request.

Length mixes (block size 16): Alpaca-like, prompts U[5, 80] and outputs U[5, 300]
tokens; ShareGPT-like, prompts U[100, 1000] and outputs U[50, 700]. Requests arrive
one every `--gap` steps.

    python benchmarks/memory_sharing.py [--requests 200] [--out docs/memory_sharing.json]
        [--plot docs/blocks_over_time.png] [--calibrate]

--calibrate also runs the real engine with the embedded SmolLM2 (CPU) on a dozen short
instruction prompts (48 output tokens; about 30 s on 2 cores) and the synthetic
runner on the same lengths, to compare the sharing a real model's beams give with the
synthetic model's.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from harness import environment, write_json
from pagedserve._native import BlockManager
from pagedserve.engine.batch import SampleResult, ScheduledBatch
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams

BLOCK_SIZE = 16
VOCAB = 1000
SIGMA = 5.5  # logit scale: fitted so short beam searches share as much as SmolLM2 beams
MIXES = {
    "alpaca": {"prompt": (5, 80), "output": (5, 300)},
    "sharegpt": {"prompt": (100, 1000), "output": (50, 700)},
}


class SyntheticRunner:
    """Answers a ScheduledBatch like ModelRunner.execute, without a model."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def logprobs(self, context: list[int]) -> np.ndarray:
        # A pure function of (length, last tokens): the same beam history always gets
        # the same distribution, different histories (almost surely) different ones.
        key = hash((self.seed, len(context), tuple(context[-4:]))) & 0xFFFFFFFF
        z = np.random.default_rng(key).standard_normal(VOCAB) * SIGMA
        return z - (np.log(np.exp(z - z.max()).sum()) + z.max())

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        out: list[SampleResult | None] = []
        for w in batch.work:
            if not w.sample:
                out.append(None)
            elif w.params.beam_width > 1:
                lp = self.logprobs(w.prompt_token_ids + w.output_token_ids)
                k = w.params.beam_width  # ignore_eos: no stop tokens to make room for
                top = np.argpartition(-lp, k)[:k]
                top = top[np.argsort(-lp[top], kind="stable")]
                cands = [(int(t), float(lp[t])) for t in top]
                out.append(SampleResult(cands[0][0], cands[0][1], beam_candidates=cands))
            else:
                rng = random.Random(hash((w.params.seed, w.sample_index)))
                out.append(SampleResult(rng.randrange(VOCAB), -1.0))
        return out


def make_requests(mix: str, num: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    (p_lo, p_hi), (o_lo, o_hi) = MIXES[mix]["prompt"], MIXES[mix]["output"]
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(p_lo, p_hi))],
             rng.randint(o_lo, o_hi)) for _ in range(num)]


def simulate(requests, mode: str, k: int, gap: int, seed: int = 0) -> dict:
    """mode: "parallel" (n = k) or "beam" (beam_width = k). Returns the per-step series
    of blocks in use with and without sharing."""
    need = sum(k * ((len(p) + o) // BLOCK_SIZE + 2) for p, o in requests)
    bm = BlockManager(need, 0, BLOCK_SIZE, enable_prefix_caching=False, watermark=0.0)
    sched = Scheduler(bm, max_num_seqs=1 << 20, max_num_batched_tokens=1 << 30,
                      max_model_len=1 << 20, preemption_mode="recompute")
    runner = SyntheticRunner(seed)
    with_sharing, without = [], []
    pending = list(enumerate(requests))
    step = 0
    while pending or sched.has_unfinished_requests():
        while pending and pending[0][0] * gap <= step:
            i, (prompt, out_len) = pending.pop(0)
            p = (SamplingParams(n=k, seed=i, max_tokens=out_len, ignore_eos=True)
                 if mode == "parallel" else
                 SamplingParams(beam_width=k, max_tokens=out_len, ignore_eos=True))
            sched.add_request(str(i), None, prompt, p)
        batch = sched.schedule()
        for seq, group in sched.update(batch, runner.execute(batch)):
            if group.beam is None and len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish_seq(seq, "length")
        with_sharing.append(bm.num_gpu_blocks - bm.num_free_gpu_blocks)
        without.append(sum(-(-bm.num_tokens(s) // BLOCK_SIZE) for s in bm.seq_ids()))
        step += 1
    assert sum(sched.num_preemptions.values()) == 0, "the pool was meant to be big enough"
    assert bm.num_free_gpu_blocks == bm.num_gpu_blocks and not bm.seq_ids()
    return {"with": with_sharing, "without": without}


CALIBRATION_PROMPTS = [
    "Give three tips for staying healthy.",
    "What are the three primary colors?",
    "Describe the structure of an atom in a few sentences, for a curious ten-year-old.",
    "How can we reduce air pollution in large cities?",
    "Write a short story about a robot who learns to paint, in the style of a fairy tale, "
    "with a happy ending and a moral for children.",
    "Explain why the sky is blue.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "List five fruits that are rich in vitamin C and say which one you like best and why.",
    "Write a haiku about the ocean.",
    "Suggest a name for a coffee shop next to a library, and explain the idea behind it "
    "in one or two sentences so the owner can put it on the menu.",
    "What is the capital of Australia?",
]


def engine_series(engine, requests, mode: str, k: int) -> dict:
    """The same measurement on a real LLMEngine (all requests queued at once)."""
    bm = engine.block_manager
    for i, (prompt, out_len) in enumerate(requests):
        p = (SamplingParams(n=k, seed=i, temperature=1.0, max_tokens=out_len, ignore_eos=True)
             if mode == "parallel" else
             SamplingParams(beam_width=k, max_tokens=out_len, ignore_eos=True))
        engine.add_request(str(i), prompt, p)
    with_sharing, without = [], []
    while engine.has_unfinished_requests():
        engine.step()
        with_sharing.append(bm.num_gpu_blocks - bm.num_free_gpu_blocks)
        without.append(sum(-(-bm.num_tokens(s) // BLOCK_SIZE) for s in bm.seq_ids()))
    return {"with": with_sharing, "without": without}


def calibrate(out_len: int = 48) -> list[dict]:
    from pagedserve import LLM, EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine

    llm = LLM(device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=1024,
              enable_prefix_caching=False, swap_space_gb=0.01)
    requests = [(llm.tokenizer(p)["input_ids"], out_len) for p in CALIBRATION_PROMPTS]
    rows = []
    for k in (2, 4, 6):
        engine = LLMEngine(EngineConfig(**llm.engine.config.__dict__), runner=llm.engine.runner,
                           tokenizer=llm.engine.tokenizer)
        real = savings(engine_series(engine, requests, "beam", k))
        synthetic = savings(simulate(requests, "beam", k, gap=0))
        rows.append({"beam_width": k, "smollm2_savings": real, "synthetic_savings": synthetic,
                     "prompt_tokens": [len(p) for p, _ in requests], "output_tokens": out_len})
        print(f"calibration beam width {k}: SmolLM2 saves {real:.1%}, the synthetic model "
              f"{synthetic:.1%} on the same lengths", flush=True)
    return rows


def savings(series: dict) -> float:
    return 1.0 - sum(series["with"]) / sum(series["without"])


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], curves.items()):
        ax.plot(series["without"], label="without sharing (private copies)", color="tab:red")
        ax.plot(series["with"], label="with sharing (fork + copy-on-write)", color="tab:blue")
        ax.set_title(f"{title}: {savings(series):.1%} fewer block-steps")
        ax.set_xlabel("engine step")
        ax.set_ylabel(f"KV blocks in use ({BLOCK_SIZE} tokens each)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def entropy_of_model(samples: int = 200) -> float:
    runner = SyntheticRunner()
    h = []
    for i in range(samples):
        lp = runner.logprobs([i, i + 1, i + 2])
        h.append(float(-(np.exp(lp) * lp).sum()))
    return sum(h) / len(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per trace")
    ap.add_argument("--gap", type=int, default=4, help="engine steps between arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--plot", help="write the blocks-over-time plot (PNG) here")
    ap.add_argument("--calibrate", action="store_true",
                    help="also compare with real SmolLM2 beam search on short prompts")
    args = ap.parse_args()

    rows, curves = [], {}
    for mix in MIXES:
        requests = make_requests(mix, args.requests, args.seed)
        for mode in ("parallel", "beam"):
            for k in (2, 4, 6):
                t0 = time.perf_counter()
                series = simulate(requests, mode, k, args.gap, args.seed)
                row = {"mix": mix, "mode": mode, "k": k, "savings": savings(series),
                       "mean_blocks_with": sum(series["with"]) / len(series["with"]),
                       "mean_blocks_without": sum(series["without"]) / len(series["without"]),
                       "peak_blocks_with": max(series["with"]),
                       "peak_blocks_without": max(series["without"]),
                       "steps": len(series["with"]), "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"{mix:9s} {mode:8s} k={k}  saved {row['savings']:6.1%}  "
                      f"mean blocks {row['mean_blocks_with']:9.1f} vs "
                      f"{row['mean_blocks_without']:9.1f}  ({row['seconds']:.1f} s)", flush=True)
                if mix == "sharegpt" and k == 4:
                    what = "n" if mode == "parallel" else "beam width"
                    curves[f"ShareGPT-like, {what} = 4"] = series
    result = {"block_size": BLOCK_SIZE, "requests": args.requests, "gap_steps": args.gap,
              "seed": args.seed, "synthetic_model": {"vocab": VOCAB, "sigma": SIGMA,
                                                     "mean_entropy_nats": entropy_of_model()},
              "mixes": MIXES, "environment": environment(), "rows": rows}
    if args.calibrate:
        result["calibration"] = calibrate()
    write_json(args.out, result)
    if args.plot:
        plot(curves, args.plot)


if __name__ == "__main__":
    main()
