"""Step-loop throughput with tracing on vs off, and what tracing costs per request.

One engine, two gRPC servers in this process serving it: one with tracing off
(metrics on), one exporting every request's spans over OTLP/gRPC (sampler always_on) to
a receiver in another process, with the SDK's default batching. Batches of requests
alternate between the two servers, a closed loop of `--concurrency` clients each,
every request carrying a sampled W3C `traceparent`. Engine steps and generated tokens
per second of wall time are compared pairwise (off, on adjacent in time), so drift in
the machine's load cancels; the summary takes the median of the pair ratios.

Wall time suffers from whatever else runs on the machine; a thread's CPU time much
less. So each batch also records the CPU time per step of the engine thread (tracing
must add nothing to it), of the server's event loop (where spans are built when a
request ends) and of the span exporter's thread. The tracing CPU per step (the event
loop's extra plus the exporter's), over the engine thread's CPU per step, bounds the
loss of throughput: it is the loss if none of that work overlapped the step loop.
Measured on its own too: the CPU time to build and encode one request's spans, and the
cost of one timeline record, the engine's only tracing work.

    python benchmarks/tracing_overhead.py --device cpu --pairs 4        # the embedded SmolLM2
    python benchmarks/tracing_overhead.py --device cpu --dummy small --requests 128 --pairs 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import timeit
from unittest import mock

import grpc

from harness import environment, write_json
from pagedserve.cli import add_engine_flags, engine_config_from_args
from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECEIVER = os.path.join(ROOT, "tests", "otlp_receiver.py")
# Random-weight Llamas for --dummy: on 2 CPU cores a 16-sequence decode step of `small`
# takes about 10 ms of CPU (a GPU step's order of magnitude), of `tiny` about 1.5 ms.
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "hidden_act": "silu", "eos_token_id": 2, "bos_token_id": 1,
          "tie_word_embeddings": True}
DUMMY = {
    "small": dict(_LLAMA, vocab_size=16000, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(_LLAMA, vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


SERVER_LOOP = "server-event-loop"


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name=SERVER_LOOP, daemon=True).start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def drive(target: str, prompts: list[list[int]], output_len: int,
                concurrency: int) -> None:
    """A closed loop: each client sends its next request when its last one ends."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        queue = list(prompts)

        async def client() -> None:
            while queue:
                prompt = queue.pop()
                traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
                request = pb.GenerateRequest(
                    prompt_token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
                        max_tokens=output_len, ignore_eos=True, temperature=0.0))
                reply = await stub.Generate(request, metadata=(("traceparent", traceparent),),
                                            timeout=600)
                assert reply.usage.completion_tokens == output_len

        await asyncio.gather(*(client() for _ in range(concurrency)))


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of the threads that matter: the engine's step loop, the server's
    event loop (servicer, interceptors, span building) and the span exporter."""
    def cpu(thread: threading.Thread) -> float:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))

    out = {"engine": 0.0, "server_loop": 0.0, "exporter": 0.0}
    for t in threading.enumerate():
        if t.name == "pagedserve-engine":
            out["engine"] += cpu(t)
        elif t.name == SERVER_LOOP:
            out["server_loop"] += cpu(t)
        elif t.name.startswith("OtelBatch"):
            out["exporter"] += cpu(t)
    return out


def measure(engine, target: str, prompts, args) -> dict:
    before, cpu = engine.engine_stats, thread_cpu()
    start = time.perf_counter()
    asyncio.run(drive(target, prompts, args.output_len, args.concurrency))
    wall = time.perf_counter() - start
    cpu = {k: v - cpu[k] for k, v in thread_cpu().items()}
    after = engine.engine_stats
    steps = after.num_steps - before.num_steps
    tokens = after.generation_tokens - before.generation_tokens
    result = {"wall_s": wall, "steps": steps, "steps_per_s": steps / wall,
              "tokens_per_s": tokens / wall, "ms_per_step": 1000 * wall / steps}
    # Thread CPU time hardly moves when other programs take the cores; wall time does.
    result.update({f"{k}_cpu_ms_per_step": 1000 * v / steps for k, v in cpu.items()})
    return result


def tracing_cpu_per_request(last_output, params, model: str, n: int = 300) -> dict:
    """CPU seconds to build one request's spans (as the servicer does when it ends) and
    to encode them for OTLP (as the exporter thread does)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pagedserve.observability.spans import emit_request_spans

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    with tracer.start_as_current_span("rpc") as rpc:
        pass
    build = encode = 0.0
    for _ in range(n):  # one request at a time, spans dropped after: as in the server
        start = time.thread_time()
        emit_request_spans(tracer, last_output, params, model, rpc)
        spans = exporter.get_finished_spans()
        exporter.clear()
        middle = time.thread_time()
        encode_spans(spans).SerializeToString()
        build, encode = build + middle - start, encode + time.thread_time() - middle
    per_request = len(spans)
    build, encode = build / n, encode / n
    return {"spans_per_request": per_request + 1,  # + the RPC span
            "build_us": 1e6 * build, "encode_us": 1e6 * encode}


def record_cost_ns() -> float:
    """One timeline record as the scheduler makes it: a tuple and a list append."""
    from pagedserve.observability.timeline import PhaseEvent

    events: list = []
    n = 200_000
    t = timeit.timeit(lambda: events.append(PhaseEvent("prefill_chunk", 1.0, 2.0, {
        "tokens": 16, "start": 0, "seq": 0, "sampled": True})), number=n)
    return 1e9 * t / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests per batch")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=48)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--pairs", type=int, default=6, help="(off, on) batch pairs")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--dummy", choices=sorted(DUMMY),
                   help="serve a random-weight Llama of this shape (sets --model, --load-format)")
    p.add_argument("--out", help="write the batches and summary as JSON")
    add_engine_flags(p)
    args = p.parse_args()
    if args.dummy:
        import tempfile

        args.model, args.load_format = tempfile.mkdtemp(prefix=f"{args.dummy}-llama-"), "dummy"
        with open(os.path.join(args.model, "config.json"), "w") as f:
            json.dump(DUMMY[args.dummy], f)

    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.observability.metrics import Metrics
    from pagedserve.observability.observer import Observability
    from pagedserve.observability.tracing import Tracing
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.server.app import Server, start_engine
    from pagedserve.server.config import ServerConfig

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    receiver = subprocess.Popen([sys.executable, RECEIVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    endpoint = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
    with mock.patch.dict(os.environ, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                      "OTEL_TRACES_SAMPLER": "always_on"}):
        tracing = Tracing.from_env()
    llm_engine = LLMEngine(engine_config_from_args(args))
    loop = LoopThread()
    engine = loop.run(start_engine(llm_engine, 100000))
    servers = {"off": Server(ServerConfig(host="127.0.0.1", port=0),
                             Observability(None, Metrics())),
               "on": Server(ServerConfig(host="127.0.0.1", port=0),
                            Observability(tracing, Metrics()))}
    for server in servers.values():
        loop.run(server.start())
        loop.run(server.attach(engine))
    targets = {mode: f"127.0.0.1:{s.port}" for mode, s in servers.items()}

    rng = random.Random(0)
    vocab = llm_engine.vocab_size
    prompts = [[rng.randrange(vocab // 4, vocab // 2) for _ in range(args.input_len)]
               for _ in range(args.requests)]
    for mode in ("off", "on"):  # warm-up, not measured
        asyncio.run(drive(targets[mode], prompts[:args.concurrency], args.output_len,
                          args.concurrency))
    batches = []
    try:
        for i in range(args.pairs):
            pair = {}
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                pair[mode] = measure(engine, targets[mode], prompts, args)
                r = pair[mode]
                print(f"{mode:3s}  {r['wall_s']:7.2f} s  {r['steps_per_s']:7.2f} steps/s  "
                      f"{r['tokens_per_s']:8.1f} tok/s  {r['ms_per_step']:7.2f} ms/step  "
                      f"CPU ms/step: engine {r['engine_cpu_ms_per_step']:7.2f}, server loop "
                      f"{r['server_loop_cpu_ms_per_step']:5.2f}, exporter "
                      f"{r['exporter_cpu_ms_per_step']:5.2f}", flush=True)
            batches.append(pair)
        tracing.force_flush()
    finally:
        for server in servers.values():
            loop.run(server.stop())
        loop.run(engine.stop())
        tracing.shutdown()
        receiver.stdin.close()
        spans = int(receiver.stdout.readline() or 0)
        receiver.wait()

    # A finished request of the workload's shape, for the per-request tracing cost.
    llm_engine.add_request("probe", prompts[0], SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=0.0))
    last = None
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            last = output
    cost = tracing_cpu_per_request(last, SamplingParams(max_tokens=args.output_len),
                                   llm_engine.model_name)
    def median(mode: str, key: str) -> float:
        return statistics.median(b[mode][key] for b in batches)

    ratios = [b["on"]["steps_per_s"] / b["off"]["steps_per_s"] for b in batches]
    engine_cpu = median("off", "engine_cpu_ms_per_step")
    # What tracing adds: span building on the server's event loop, and export on its own
    # thread (all of it, wherever the batching delay put it, per traced step).
    export_ms = sum(b[m]["exporter_cpu_ms_per_step"] * b[m]["steps"] for b in batches for m in b)
    tracing_cpu = (median("on", "server_loop_cpu_ms_per_step")
                   - median("off", "server_loop_cpu_ms_per_step")
                   + export_ms / sum(b["on"]["steps"] for b in batches))
    finished_per_step = args.concurrency / (args.output_len + 1)  # ~1 step per token
    per_request_us = cost["build_us"] + cost["encode_us"]
    summary = {
        "pair_ratios_on_off": ratios,
        "steps_ratio_on_off_median": statistics.median(ratios),
        **{f"{k}_cpu_ms_per_step": {m: median(m, f"{k}_cpu_ms_per_step") for m in ("off", "on")}
           for k in ("engine", "server_loop", "exporter")},
        "tracing_cpu_ms_per_step": tracing_cpu,
        # As if none of the tracing work overlapped the step loop: an upper bound.
        "throughput_loss_bound": tracing_cpu / engine_cpu,
        "spans_exported": spans,
        "tracing_cpu_us_per_request_isolated": per_request_us, **cost,
        "isolated_share_of_engine_step": per_request_us * 1e-3 * finished_per_step / engine_cpu,
        "timeline_record_ns": record_cost_ns(),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        meta = {"command": " ".join(["benchmarks/tracing_overhead.py", *sys.argv[1:]]),
                "model": args.dummy and f"dummy {args.dummy}: {DUMMY[args.dummy]}"
                or llm_engine.model_name, "device": str(llm_engine.config.device),
                "environment": environment(), "workload": {k: getattr(args, k) for k in (
                    "requests", "concurrency", "input_len", "output_len", "pairs")}}
        write_json(args.out, {"meta": meta, "batches": batches, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
