"""A real pagedserve gRPC server with observability on, for the tracing and metrics tests:
the engine loop, the servicer and the interceptors as `pagedserve serve` runs them, on a
loopback port, driven from blocking gRPC clients."""

from __future__ import annotations

import json
import os
import time
from unittest import mock

import grpc

from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.observability.metrics import Metrics
from pagedserve.observability.observer import Observability
from pagedserve.observability.tracing import Tracing
from pagedserve.server.app import Server, start_engine
from pagedserve.server.config import ServerConfig
from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc
from server_fixtures import LoopThread

# A Llama of random weights small enough that a step takes milliseconds on CPU.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "eos_token_id": 2, "bos_token_id": 1, "tie_word_embeddings": True,
}


def tiny_model(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY_LLAMA, f)
    return str(directory)


def tracing_to(endpoint: str, **env: str) -> Tracing:
    """Tracing configured the way a deployment does it: OTEL_* variables."""
    settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_BSP_SCHEDULE_DELAY": "50", **env}
    with mock.patch.dict(os.environ, settings):
        tracing = Tracing.from_env()
    assert tracing is not None
    return tracing


class ObservedServer:
    """LLMEngine -> AsyncEngine -> Server(observability) on 127.0.0.1:<free port>."""

    def __init__(self, engine_config: EngineConfig, *, tracing: Tracing | None = None,
                 metrics: bool = False) -> None:
        self.llm_engine = LLMEngine(engine_config)
        self.metrics = Metrics() if metrics else None
        self.metrics_port = self.metrics.serve(0, "127.0.0.1") if metrics else None
        self.observability = Observability(tracing, self.metrics)
        self.loop = LoopThread()
        self.engine = self.loop.run(start_engine(self.llm_engine, 256))
        self.server = Server(ServerConfig(host="127.0.0.1", port=0), self.observability)

        async def up() -> None:
            await self.server.start()
            await self.server.attach(self.engine)

        self.loop.run(up())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.model = self.llm_engine.model_name

    def generate(self, prompt, *, metadata=(), timeout: float = 120, stream: bool = False,
                 request_id: str = "", priority: int = 0, **sampling) -> pb.GenerateResponse:
        request = pb.GenerateRequest(request_id=request_id, priority=priority,
                                     sampling=pb.SamplingParams(**sampling))
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        if not stream:
            return self.stub.Generate(request, metadata=metadata, timeout=timeout)
        messages = list(self.stub.StreamGenerate(request, metadata=metadata, timeout=timeout))
        return messages

    def wait_idle(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine.engine_stats
            if self.engine.num_in_flight == 0 and stats.num_running == 0 \
                    and stats.num_waiting == 0 and stats.num_swapped == 0:
                return stats
            time.sleep(0.02)
        raise AssertionError(f"engine not idle after {timeout}s")

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop())
        self.loop.run(self.engine.stop())
        self.loop.close()
        self.observability.shutdown()
