"""`pagedserve serve --tensor-parallel-size 2` end to end on CPU: a real server process,
its spawned worker, gRPC on loopback.

The worker is killed mid-stream deterministically: the server process is frozen
(SIGSTOP) while a request is known to be running, the worker (its pid from the
engine's start-up log) is killed, and only then does the server run again.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve import LLM, SamplingParams
from pagedserve.client import Client

from test_tensor_parallel import tiny_llama

PAGEDSERVE = [sys.executable, "-c", "import sys; from pagedserve.cli import main; sys.exit(main())"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENGINE = ["--device", "cpu", "--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "96",
          "--swap-space-gb", "0.002", "--max-model-len", "256"]


class ServerProcess:
    def __init__(self, model: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*PAGEDSERVE, "serve", "--model", model, "--tensor-parallel-size", "2", *ENGINE,
             "--host", "127.0.0.1", "--port", str(self.port), "--disable-tracing",
             "--metrics-port", "0", "--shutdown-grace-period", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def worker_pid(self) -> int:
        found = re.search(r"worker pids rank1=(\d+)", self.log())
        assert found, self.log()
        return int(found.group(1))

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def wait_health(self, want: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if self.health() == want:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"health never became {want}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-serve")
    tiny_llama(path)
    return str(path)


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def greedy(n: int) -> dict:
    return dict(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_serve_streams_cancels_and_fails_cleanly_when_a_worker_dies(model):
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45]]
    with LLM(model, device="cpu", dtype="float32", block_size=4, num_kv_blocks=96,
             swap_space_gb=0.002) as single:
        want = [o.outputs[0].token_ids
                for o in single.generate(prompts, SamplingParams(**greedy(12)), use_tqdm=False)]
    server = ServerProcess(model)
    try:
        server.wait_health(SERVING, 180)
        worker = server.worker_pid()
        family = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        assert worker in family
        with Client(server.target, timeout=120) as client:
            for prompt, tokens in zip(prompts, want):  # streamed ids equal the single process's
                got = [t for m in client.stream_generate(prompt, **greedy(12)) for t in m.token_ids]
                assert got == tokens

            call = client.stream_generate([9, 10, 11], **greedy(200))
            next(call)
            call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
            got = [t for m in client.stream_generate(prompts[0], **greedy(12)) for t in m.token_ids]
            assert got == want[0]  # the ranks still run in step after the cancel

            call = client.stream_generate([9, 10, 11], **greedy(200))
            first = next(call)  # running: 200 tokens cannot be done while the server is frozen
            assert len(first.token_ids) < 200
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                os.kill(worker, signal.SIGKILL)
                assert wait_dead(worker, 30)  # a zombie until the frozen server reaps it
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            server.wait_health(NOT_SERVING, 30)
            assert "tensor-parallel worker rank 1" in server.log()
    finally:
        server.stop()
    assert server.proc.returncode is not None
    # The server's children (the worker, multiprocessing's resource tracker) end with it;
    # the tracker only once it reads the closed pipe, so its end is waited for.
    assert not [pid for pid in family if not wait_dead(pid, 30)], server.log()
