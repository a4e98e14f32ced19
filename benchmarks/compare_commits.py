"""Offline CPU throughput of several checkouts of pagedserve, side by side in one run.

Each checkout (a directory holding a built tree: `pyservice/pagedserve` with its
`_native` module) serves the same workload through the public API, `LLM.generate`, in a
fresh process per run, with the rounds interleaved so that a change in the machine's
load reaches every checkout alike. The workload is throughput_cpu.py's (issue 4):
random token-id prompts of U[16, 256] tokens, U[8, 128] output tokens each with
ignore_eos, greedy, on the embedded SmolLM2-135M. Greedy token ids are compared too:
the same across checkouts unless a change meant to alter them.

    git worktree add /tmp/before <commit> && (build it as the README says)
    python benchmarks/compare_commits.py /tmp/before . --dtype float32 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from harness import CPU_MIX, environment, random_requests, write_json

_CHILD = """
import json, sys, time
from pagedserve import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(dtype=args["dtype"], device="cpu", max_num_seqs=256)
from harness import random_requests
work = random_requests(args["num"], llm.engine.vocab_size, args["seed"], *args["mix"])
prompts = [ids for ids, _ in work]  # token-id prompts
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in work]
llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
seconds = time.perf_counter() - t
ids = [list(o.outputs[0].token_ids) for o in outs]
json.dump({"seconds": seconds, "tokens": sum(map(len, ids)), "ids": ids},
          open(args["result"], "w"))
"""


def run_one(checkout: str, args, result: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.abspath(checkout), "pyservice"), here]))
    spec = {"dtype": args.dtype, "num": args.num_requests, "seed": args.seed,
            "mix": list(CPU_MIX), "result": result}
    subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, check=True,
                   cwd=tempfile.gettempdir())
    with open(result) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="+", help="directories of built checkouts")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {c: [] for c in args.checkouts}
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.checkouts if r % 2 == 0 else args.checkouts[::-1]
            for checkout in order:
                load = os.getloadavg()[0]
                res = run_one(checkout, args, os.path.join(tmp, "result.json"))
                digests[checkout] = hashlib.sha256(json.dumps(res.pop("ids")).encode()).hexdigest()
                res.update(tokens_per_s=res["tokens"] / res["seconds"], load_before=load)
                runs[checkout].append(res)
                print(f"round {r} {checkout}: {res['tokens_per_s']:.1f} tok/s "
                      f"({res['seconds']:.1f} s, load {load:.2f})", flush=True)
    same = len(set(digests.values())) == 1
    print(f"greedy ids identical across checkouts: {same}")
    write_json(args.out, {"environment": environment(), "args": vars(args), "runs": runs,
                          "greedy_ids_identical": same})


if __name__ == "__main__":
    main()
