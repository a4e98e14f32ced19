"""Load test: Poisson arrivals against the gRPC server vs the same workload in-process.

For each arrival rate the same requests (random prompt token ids, fixed output length,
ignore_eos) are sent with exponential inter-arrival gaps, once through gRPC streaming
and once straight into an in-process AsyncEngine. Reported per rate and path:
throughput (output tokens/s, requests/s), time to first token and time per output
token (p50/p99), end-to-end latency.

The server runs as a subprocess (`pagedserve serve`) with the same engine
flags, and is stopped before the in-process engine loads, so the two never share the
device. `--target` measures an already running server instead.

    python benchmarks/serve_load.py --rates 1,4,16,inf --num-requests 64 \\
        --input-len 128 --output-len 64 --out docs/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import environment, write_json
from pagedserve.cli import add_engine_flags, engine_config_from_args
from pagedserve.client import AsyncClient

@dataclass
class Sample:
    ok: bool
    sent: float
    first_token: float | None = None
    done: float | None = None
    tokens: int = 0


@dataclass
class Workload:
    prompts: list[list[int]]
    arrivals: list[float]          # seconds after the start
    output_len: int


def make_workload(num: int, input_len: int, output_len: int, rate: float, vocab: int,
                  seed: int) -> Workload:
    rng = random.Random(seed)
    # Ids from the low part of the vocabulary: real tokens in any tokenizer.
    prompts = [[rng.randrange(100, min(vocab, 30000)) for _ in range(input_len)]
               for _ in range(num)]
    t, arrivals = 0.0, []
    for _ in range(num):
        arrivals.append(t)
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return Workload(prompts, arrivals, output_len)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(samples: list[Sample], output_len: int) -> dict:
    ok = [s for s in samples if s.ok and s.first_token is not None]
    if not ok:
        return {"completed": 0, "failed": len(samples)}
    start = min(s.sent for s in samples)
    end = max(s.done for s in ok)
    ttft = [(s.first_token - s.sent) * 1e3 for s in ok]
    tpot = [(s.done - s.first_token) * 1e3 / (s.tokens - 1) for s in ok if s.tokens > 1]
    e2e = [(s.done - s.sent) * 1e3 for s in ok]
    tokens = sum(s.tokens for s in ok)
    return {
        "completed": len(ok), "failed": len(samples) - len(ok),
        "all_tokens": all(s.tokens == output_len for s in ok),
        "duration_s": end - start, "output_tok_s": tokens / (end - start),
        "req_s": len(ok) / (end - start),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "e2e_ms_p50": percentile(e2e, 50), "e2e_ms_p99": percentile(e2e, 99),
    }


async def _replay(workload: Workload, one) -> list[Sample]:
    """Start request i at arrivals[i]; `one(i, sample)` runs it and fills the sample."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    samples = [Sample(ok=False, sent=0.0) for _ in workload.prompts]

    async def launch(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + workload.arrivals[i] - loop.time()))
        samples[i].sent = time.perf_counter()
        try:
            await one(i, samples[i])
            samples[i].ok = True
        except Exception as exc:  # noqa: BLE001 - counted as failed, reported below
            print(f"request {i} failed: {exc!r}", file=sys.stderr)
        samples[i].done = time.perf_counter()

    await asyncio.gather(*(launch(i) for i in range(len(workload.prompts))))
    return samples


async def run_grpc(target: str, workload: Workload) -> list[Sample]:
    async with AsyncClient(target) as client:
        async def one(i: int, sample: Sample) -> None:
            async for message in client.stream_generate(
                    workload.prompts[i], max_tokens=workload.output_len, ignore_eos=True,
                    temperature=0.0):
                if message.token_ids and sample.first_token is None:
                    sample.first_token = time.perf_counter()
                sample.tokens += len(message.token_ids)
        return await _replay(workload, one)


async def run_inprocess(engine, workload: Workload) -> list[Sample]:
    from pagedserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True, temperature=0.0)

    async def one(i: int, sample: Sample) -> None:
        async for output in engine.generate(f"bench-{i}-{time.monotonic_ns()}",
                                            workload.prompts[i], params):
            n = len(output.outputs[0].token_ids)
            if n and sample.first_token is None:
                sample.first_token = time.perf_counter()
            sample.tokens = n
    return await _replay(workload, one)


def forwarded_engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags given on this command line, spelled for `pagedserve serve`."""
    from pagedserve.config import EngineConfig

    argv = []
    for field in dataclasses.fields(EngineConfig):
        value = getattr(args, field.name, None)
        flag = "--" + field.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_argv: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # What the `pagedserve` console script runs, with this interpreter.
    cmd = [sys.executable, "-c", "import sys; from pagedserve.cli import main; sys.exit(main())",
           "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-queue-size", "100000", "--disable-tracing",
           "--metrics-port", "0", *engine_argv]
    proc = subprocess.Popen(cmd)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not SERVING after {timeout}s")


def run_rates(run, rates: list[float], args, vocab: int) -> dict:
    results = {}
    asyncio.run(run(make_workload(min(8, args.num_requests), args.input_len, 4, float("inf"),
                                  vocab, args.workload_seed + 1)))  # warm-up, not measured
    for rate in rates:
        workload = make_workload(args.num_requests, args.input_len, args.output_len, rate,
                                 vocab, args.workload_seed)
        results[str(rate)] = summarize(asyncio.run(run(workload)), args.output_len)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,4,16,inf",
                        help="arrival rates in requests/s, comma separated; inf = all at once")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--workload-seed", type=int, default=0,
                        help="seeds the prompts and the arrival times")
    parser.add_argument("--target", help="host:port of a running server (not started here)")
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--server-start-timeout", type=float, default=600)
    parser.add_argument("--out", help="write the results as JSON here")
    add_engine_flags(parser)  # the same flags as `pagedserve serve`, forwarded to it
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    engine_config = engine_config_from_args(args)
    engine_argv = forwarded_engine_flags(args)

    results: dict = {"grpc": {}, "inprocess": {}}
    proc = None
    target = args.target
    if target is None:
        proc, target = start_server(engine_argv, args.server_start_timeout)
    try:
        async def info():
            async with AsyncClient(target) as client:
                return await client.model_info()
        model = asyncio.run(info())
        results["grpc"] = run_rates(lambda w: run_grpc(target, w), rates, args,
                                    model.vocab_size)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)

    if not args.skip_inprocess:
        from pagedserve.engine.llm_engine import LLMEngine
        from pagedserve.server.async_engine import AsyncEngine

        llm_engine = LLMEngine(engine_config)

        async def inprocess(workload: Workload) -> list[Sample]:
            engine = AsyncEngine(llm_engine, max_queue_size=100000)
            engine.start()
            try:
                return await run_inprocess(engine, workload)
            finally:
                await engine.stop()
        results["inprocess"] = run_rates(inprocess, rates, args, llm_engine.vocab_size)

    print_table(results, rates)
    if args.out:
        report = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
                  "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "model": {"name": model.model, "device": model.device, "dtype": model.dtype,
                            "max_model_len": model.max_model_len},
                  "host": environment(), "results": results}
        write_json(args.out, report)
        print(f"wrote {args.out}")


def print_table(results: dict, rates: list[float]) -> None:
    header = (f"{'rate':>6} {'path':>10} {'done':>5} {'tok/s':>8} {'req/s':>6} "
              f"{'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9} {'vs inproc':>9}")
    print(header)
    print("-" * len(header))
    for rate in rates:
        for path in ("grpc", "inprocess"):
            r = results.get(path, {}).get(str(rate))
            if not r or not r.get("completed"):
                continue
            base = results.get("inprocess", {}).get(str(rate), {}).get("output_tok_s")
            ratio = f"{r['output_tok_s'] / base:9.3f}" if base else f"{'':>9}"
            print(f"{rate:>6g} {path:>10} {r['completed']:>5} {r['output_tok_s']:>8.1f} "
                  f"{r['req_s']:>6.2f} {r['ttft_ms_p50']:>9.1f} {r['ttft_ms_p99']:>9.1f} "
                  f"{r['tpot_ms_p50']:>9.2f} {r['tpot_ms_p99']:>9.2f} {ratio}")


if __name__ == "__main__":
    main()
