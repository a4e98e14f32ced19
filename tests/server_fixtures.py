"""Helpers for the gRPC server tests: a server on a background event loop, a scripted
engine for the failure and queue tests, and test certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from pagedserve.engine.stats import EngineStats, ServingStats
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from pagedserve.server.app import Server, start_engine
from pagedserve.server.config import ServerConfig


class LoopThread:
    """An asyncio loop on its own thread, so tests can use blocking gRPC clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Serving:
    """One AsyncEngine around `llm_engine`, served by any number of Servers."""

    def __init__(self, llm_engine, max_queue_size: int = 1024) -> None:
        self.llm_engine = llm_engine
        self.loop = LoopThread()
        self.engine = self.loop.run(start_engine(llm_engine, max_queue_size))
        self.servers: list[Server] = []

    def add_server(self, **settings) -> Server:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        server = Server(ServerConfig(**settings))

        async def up() -> None:
            await server.start()
            await server.attach(self.engine)

        self.loop.run(up())
        self.servers.append(server)
        return server

    def stats(self) -> ServingStats:
        return self.loop.run(_on_loop(self.engine.stats))

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Stats once no request is in flight and the engine has nothing left to run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats.num_in_flight == 0 and stats.num_running == 0 \
                    and stats.num_waiting == 0 and stats.num_swapped == 0:
                return stats
            time.sleep(0.02)
        raise AssertionError(f"engine not idle after {timeout}s: {self.stats()}")

    def close(self) -> None:
        for server in self.servers:
            self.loop.run(server.stop())
        self.loop.run(self.engine.stop())
        self.loop.close()


async def _on_loop(fn):
    return fn()


# ---- a scripted engine ---------------------------------------------------------
class ScriptedEngine:
    """Implements the LLMEngine contract with deterministic tokens and no model.

    Token k of a request is (sum(prompt) + k) % vocab_size; each step advances every
    request by one token. `gate` (cleared) holds the step loop so requests pile up in
    the queue; `fail_next_step` makes step() raise like a device error would.
    """

    def __init__(self, vocab_size: int = 100, max_model_len: int = 64,
                 num_blocks: int = 64, block_size: int = 4) -> None:
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.model_name = "scripted"
        self.tokenizer = None
        self.config = SimpleNamespace(block_size=block_size, device="cpu", dtype="float32")
        self.num_blocks = num_blocks
        self.requests: dict[str, dict] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next_step = False
        self.step_started = threading.Event()

    def _blocks(self, request: dict) -> int:
        n = len(request["prompt"]) + len(request["out"])
        return -(-n // self.config.block_size)

    def stats(self) -> EngineStats:
        used = sum(self._blocks(r) for r in self.requests.values())
        return EngineStats(num_running=len(self.requests), num_waiting=0, num_swapped=0,
                           num_free_gpu_blocks=self.num_blocks - used,
                           num_total_gpu_blocks=self.num_blocks,
                           num_free_cpu_blocks=0, num_total_cpu_blocks=0)

    def add_request(self, request_id, prompt, params, priority=0, cache_salt=0,
                    output_kind=RequestOutputKind.CUMULATIVE) -> None:
        if isinstance(prompt, str):
            prompt = [ord(c) % self.vocab_size for c in prompt]
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, max_model_len is "
                             f"{self.max_model_len}")
        self.requests[request_id] = {"prompt": list(prompt), "out": [], "params": params,
                                     "arrival": time.monotonic(), "kind": output_kind}

    def abort_request(self, request_id) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.step_started.set()
        self.gate.wait()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated device error: illegal memory access")
        outputs = []
        for request_id, r in list(self.requests.items()):
            r["out"].append((sum(r["prompt"]) + len(r["out"])) % self.vocab_size)
            done = len(r["out"]) >= r["params"].max_tokens
            out = r["out"][-1:] if r["kind"] is RequestOutputKind.DELTA else r["out"]
            text = "".join(chr(97 + t % 26) for t in out)
            completion = CompletionOutput(index=0, text=text, token_ids=list(out),
                                          finish_reason="length" if done else None,
                                          num_tokens=len(r["out"]))
            now = time.monotonic()
            metrics = RequestMetrics(arrival_time=r["arrival"], first_scheduled_time=now,
                                     first_token_time=now, finished_time=now if done else None,
                                     num_prompt_tokens=len(r["prompt"]))
            outputs.append(RequestOutput(request_id, None, r["prompt"], [completion], done,
                                         metrics))
            if done:
                del self.requests[request_id]
        return outputs


# ---- certificates --------------------------------------------------------------
@dataclass
class Pki:
    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_client_cert: bytes   # signed by an unrelated CA: mTLS must refuse it
    other_client_key: bytes


def make_pki() -> Pki:
    """A CA, a server cert for localhost/127.0.0.1, a client cert, and a stranger."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def cert(name: str, key, issuer_name, issuer_key, ca: bool = False, sans=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def make_ca(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return key, subject, cert(name, key, subject, key, ca=True)

    ca_key, ca_name, ca_cert = make_ca("pagedserve test CA")
    other_key, other_name, _ = make_ca("unrelated CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = cert("localhost", server_key, ca_name, ca_key, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = cert("client", client_key, ca_name, ca_key)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger_cert = cert("stranger", stranger_key, other_name, other_key)
    pem = serialization.Encoding.PEM
    return Pki(ca_cert.public_bytes(pem), server_cert.public_bytes(pem), pem_key(server_key),
               client_cert.public_bytes(pem), pem_key(client_key),
               stranger_cert.public_bytes(pem), pem_key(stranger_key))
