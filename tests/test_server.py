"""The gRPC service against a real server on loopback with the embedded SmolLM2 on CPU.

One AsyncEngine is served over plaintext, TLS, mTLS and token-auth ports at once; the
offline API (LLM.generate) with the same engine settings is the reference.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagedserve.client import AsyncClient, Client
from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams
from pagedserve.v1 import generate_pb2 as pb
from server_fixtures import LoopThread, ScriptedEngine, Serving, make_pki

ENGINE = dict(device="cpu", num_kv_blocks=96, max_model_len=256, max_num_seqs=16,
              swap_space_gb=0.05, seed=0)
MAX_MESSAGE_BYTES = 64 * 1024
TOKEN = "s3cret-token"
SERVICE = "pagedserve.v1.TextGeneration"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SERVING_STATUS = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = make_pki()
    d = tmp_path_factory.mktemp("pki")
    paths = {}
    for name in ("ca_cert", "server_cert", "server_key"):
        paths[name] = str(d / f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(getattr(pki, name))
    pki.paths = paths
    return pki


@pytest.fixture(scope="module")
def serving(pki):
    s = Serving(LLMEngine(EngineConfig(**ENGINE)), max_queue_size=256)
    p = pki.paths
    s.plain = s.add_server(max_message_bytes=MAX_MESSAGE_BYTES, max_n=4, max_stop_strings=3)
    s.tls = s.add_server(tls_cert_file=p["server_cert"], tls_key_file=p["server_key"])
    s.mtls = s.add_server(tls_cert_file=p["server_cert"], tls_key_file=p["server_key"],
                          tls_client_ca_file=p["ca_cert"])
    s.token = s.add_server(auth_token=TOKEN)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(serving):
    with Client(f"127.0.0.1:{serving.plain.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """The offline API, same engine settings: what the server must reproduce."""
    from pagedserve import LLM

    return LLM(**ENGINE)


def offline(reference, prompt, **sampling):
    return reference.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0]


def health_status(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def block_pool(stats: dict) -> tuple:
    return (stats.num_free_gpu_blocks, stats.num_free_cpu_blocks, stats.num_running,
            stats.num_waiting, stats.num_swapped)


# ---- results match the offline API ---------------------------------------------
SAMPLINGS = [
    dict(max_tokens=12, temperature=0.0),
    dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234),
    dict(max_tokens=8, temperature=1.0, seed=7, n=2, logprobs=2),
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded", "n2-logprobs"])
def test_unary_and_stream_equal_offline(client, reference, sampling):
    for prompt in PROMPTS:
        want = offline(reference, prompt, **sampling)
        got = client.generate(prompt, **sampling)
        assert [c.index for c in got.completions] == list(range(len(want.outputs)))
        chunks: dict[int, list] = {}
        messages = list(client.stream_generate(prompt, **sampling))
        for m in messages:
            chunks.setdefault(m.index, []).append(m)
        for w in want.outputs:
            unary = got.completions[w.index]
            assert list(unary.token_ids) == w.token_ids
            assert unary.text == w.text
            assert pb.FinishReason.Name(unary.finish_reason) == {
                "length": "FINISH_REASON_LENGTH", "stop": "FINISH_REASON_STOP"}[w.finish_reason]
            streamed = chunks[w.index]
            assert len(streamed) > 1  # really streamed, not one message at the end
            assert [t for m in streamed for t in m.token_ids] == w.token_ids
            assert "".join(m.text for m in streamed) == w.text
            assert streamed[-1].finish_reason == unary.finish_reason
            assert all(m.finish_reason == 0 for m in streamed[:-1])
            if sampling.get("logprobs"):
                assert [lp.token_id for lp in unary.logprobs] == w.token_ids
                for lp, entries in zip(unary.logprobs, w.logprobs):
                    assert len(lp.top) == 2
                    assert lp.logprob == pytest.approx(entries[lp.token_id], abs=1e-5)
                    assert lp.top[0].logprob >= lp.top[1].logprob
                assert [lp.token_id for m in streamed for lp in m.logprobs] == w.token_ids
        # Usage rides on the stream's last message only, and matches the unary one.
        assert [m.HasField("usage") for m in messages] == [False] * (len(messages) - 1) + [True]
        usage = messages[-1].usage
        assert usage.prompt_tokens == got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert usage.completion_tokens == got.usage.completion_tokens == \
            sum(len(w.token_ids) for w in want.outputs)


def test_token_ids_and_chat_prompts_equal_offline(client, reference):
    ids = reference.tokenizer("Once upon a time")["input_ids"]
    want = offline(reference, list(ids), max_tokens=6, temperature=0.0)
    got = client.generate(list(ids), max_tokens=6, temperature=0.0)
    assert list(got.completions[0].token_ids) == want.outputs[0].token_ids
    chat = [{"role": "user", "content": "Say hi."}]
    want = offline(reference, chat, max_tokens=6, temperature=0.0)
    got = client.generate(chat, max_tokens=6, temperature=0.0)
    assert list(got.completions[0].token_ids) == want.outputs[0].token_ids
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_request_id_is_echoed_and_unique_while_in_flight(serving, client):
    got = client.generate("Hi", request_id="caller-42", max_tokens=2)
    assert got.request_id == "caller-42"
    assert {m.request_id for m in client.stream_generate("Hi", request_id="c-43",
                                                         max_tokens=2)} == {"c-43"}
    long = client.stream_generate("Hi", request_id="dup", max_tokens=200, ignore_eos=True)
    next(long)
    err = rpc_error(client.generate, "Hi", request_id="dup", max_tokens=2)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.details()
    long.cancel()
    serving.wait_idle()


def test_model_info(serving, client):
    info = client.model_info()
    llm = serving.llm_engine
    assert (info.model, info.max_model_len, info.vocab_size, info.block_size) == \
        (llm.model_name, 256, llm.vocab_size, 16)
    assert info.num_gpu_blocks == 96 and info.device == "cpu" and info.dtype == "float32"


# ---- concurrency, cancellation, deadlines --------------------------------------
def test_64_concurrent_streams_complete(serving):
    before = block_pool(serving.wait_idle())

    async def main():
        async with AsyncClient(f"127.0.0.1:{serving.plain.port}", timeout=120) as c:
            async def one(i):
                tokens, finish = [], None
                async for m in c.stream_generate(f"Request number {i} says", max_tokens=4,
                                                 ignore_eos=True, temperature=0.0):
                    tokens += m.token_ids
                    finish = m.finish_reason or finish
                return tokens, finish
            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(len(t) == 4 and f == pb.FINISH_REASON_LENGTH for t, f in results)
    assert block_pool(serving.wait_idle()) == before


def test_cancelled_stream_frees_its_blocks(serving, client):
    before = serving.wait_idle()
    call = client.stream_generate("Tell me a long story about", max_tokens=200,
                                  ignore_eos=True)
    got = [next(call), next(call)]
    assert all(m.token_ids for m in got)
    during = serving.stats()
    assert during.num_running == 1 and during.num_free_gpu_blocks < \
        before.num_free_gpu_blocks
    call.cancel()
    assert block_pool(serving.wait_idle()) == block_pool(before)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_expired_deadline_frees_its_blocks(serving, client, streaming):
    before = serving.wait_idle()
    fn = client.stream_generate if streaming else client.generate
    err = rpc_error(fn, "Count slowly:", max_tokens=200, ignore_eos=True, timeout=1.0)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert serving.stats().generation_tokens > before.generation_tokens  # it ran
    assert block_pool(serving.wait_idle()) == block_pool(before)


# ---- validation ------------------------------------------------------------------
BAD = [  # (request kwargs, field named in the message)
    (dict(prompt=""), "prompt"),
    (dict(prompt="word " * 400), "prompt"),  # > max_model_len 256 tokens after tokenizing
    (dict(prompt=[1] * 256), "prompt_token_ids"),
    (dict(prompt=[1, 49152]), "prompt_token_ids[1]"),
    (dict(prompt=[]), "prompt_token_ids"),
    (dict(temperature=-0.5), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.5), "sampling.top_p"),
    (dict(top_k=-2), "sampling.top_k"),
    (dict(n=0), "sampling.n"),
    (dict(n=5), "sampling.n"),
    (dict(beam_width=0), "sampling.beam_width"),
    (dict(beam_width=5), "sampling.beam_width"),
    (dict(max_tokens=0), "sampling.max_tokens"),
    (dict(max_tokens=257), "sampling.max_tokens"),
    (dict(stop=["a", "b", "c", "d"]), "sampling.stop"),
    (dict(stop_token_ids=[50000]), "sampling.stop_token_ids[0]"),
    (dict(min_p=2.0), "sampling.min_p"),
    (dict(prompt="x" * (MAX_MESSAGE_BYTES + 100)), "prompt"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "Hello")
    for fn in (client.generate, client.stream_generate):
        err = rpc_error(fn, prompt, **kwargs)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith(field), err.details()
        assert "Traceback" not in err.details()
    # ... and the server keeps serving.
    assert len(client.generate("Hello", max_tokens=2).completions[0].token_ids) == 2


def test_missing_input_and_far_oversized_messages(client):
    err = rpc_error(client.stub.Generate, pb.GenerateRequest(), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("prompt")
    # Past twice the limit gRPC refuses the message before it is parsed.
    err = rpc_error(client.generate, "x" * (3 * MAX_MESSAGE_BYTES))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(client.generate("Hello", max_tokens=2).completions[0].token_ids) == 2


# ---- health, reflection, security --------------------------------------------------
def test_health_is_serving_after_warmup(serving, client):
    assert health_status(client.channel) == SERVING_STATUS
    assert health_status(client.channel, SERVICE) == SERVING_STATUS
    assert serving.stats().generation_tokens >= 2  # the warm-up request ran


def test_not_serving_until_an_engine_is_attached():
    from pagedserve.server.app import Server
    from pagedserve.server.config import ServerConfig

    loop = LoopThread()
    server = Server(ServerConfig(host="127.0.0.1", port=0))
    try:
        port = loop.run(server.start())
        with Client(f"127.0.0.1:{port}", timeout=10) as c:
            assert health_status(c.channel) == NOT_SERVING
            err = rpc_error(c.generate, "Hello")
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
    finally:
        loop.run(server.stop())
        loop.close()


def test_generic_reflection_client_without_stubs(serving, client):
    """Discover the service and call it with message classes built from reflection only."""
    channel = client.channel
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw):
        return next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)]),
                                              timeout=10))

    services = {s.name for s in ask(list_services="").list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = descriptor_pool.DescriptorPool()  # empty: nothing from the generated stubs
    for raw in ask(file_containing_symbol=SERVICE).file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    service = pool.FindServiceByName(SERVICE)
    assert set(service.methods_by_name) == {"Generate", "StreamGenerate", "GetModelInfo"}
    method = service.methods_by_name["Generate"]
    Request = message_factory.GetMessageClass(method.input_type)
    Response = message_factory.GetMessageClass(method.output_type)
    assert Request is not pb.GenerateRequest
    request = json_format.ParseDict(
        {"prompt": "Hello", "sampling": {"max_tokens": 5, "temperature": 0}}, Request())
    call = channel.unary_unary(f"/{SERVICE}/Generate",
                               request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)
    reply = json_format.MessageToDict(call(request, timeout=60))
    want = client.generate("Hello", max_tokens=5, temperature=0.0)
    assert reply["completions"][0]["text"] == want.completions[0].text
    assert reply["completions"][0]["finishReason"] == "FINISH_REASON_LENGTH"


def test_tls_accepts_trusting_clients_only(serving, pki):
    target = f"127.0.0.1:{serving.tls.port}"
    with Client(target, root_certificates=pki.ca_cert, timeout=60) as c:
        assert len(c.generate("Hello", max_tokens=2).completions[0].token_ids) == 2
    with Client(target, timeout=5) as c:  # plaintext to a TLS port
        assert rpc_error(c.generate, "Hello").code() == grpc.StatusCode.UNAVAILABLE
    with Client(target, root_certificates=pki.other_client_cert, timeout=5) as c:  # wrong CA
        assert rpc_error(c.generate, "Hello").code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_cert_from_the_ca(serving, pki):
    target = f"127.0.0.1:{serving.mtls.port}"
    with Client(target, root_certificates=pki.ca_cert, client_cert=pki.client_cert,
                client_key=pki.client_key, timeout=60) as c:
        assert len(c.generate("Hello", max_tokens=2).completions[0].token_ids) == 2
        assert c.model_info().vocab_size == serving.llm_engine.vocab_size
    with Client(target, root_certificates=pki.ca_cert, timeout=5) as c:  # no client cert
        assert rpc_error(c.generate, "Hello").code() == grpc.StatusCode.UNAVAILABLE
    with Client(target, root_certificates=pki.ca_cert, client_cert=pki.other_client_cert,
                client_key=pki.other_client_key, timeout=5) as c:  # a stranger's cert
        assert rpc_error(c.generate, "Hello").code() == grpc.StatusCode.UNAVAILABLE


def test_token_auth(serving):
    target = f"127.0.0.1:{serving.token.port}"
    with Client(target, token=TOKEN, timeout=60) as c:
        assert len(c.generate("Hello", max_tokens=2).completions[0].token_ids) == 2
        assert len(list(c.stream_generate("Hello", max_tokens=2))) >= 1
    for token in (None, "wrong", TOKEN + "x"):
        with Client(target, token=token, timeout=10) as c:
            for fn in (c.generate, c.stream_generate, lambda _: c.model_info()):
                err = rpc_error(fn, "Hello")
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
            # Probes need no secret.
            assert health_status(c.channel) == SERVING_STATUS


def test_tenants_never_share_cached_prompt_blocks(serving):
    """Each token's tenant hashes its prompts under its own salt: the same prompt from
    another tenant finds nothing cached (no count, no timing to read), the same tenant
    finds its own blocks."""
    server = serving.add_server(auth_tokens={"tok-a": "tenant-a", "tok-b": "tenant-b"})
    target = f"127.0.0.1:{server.port}"
    prompt = ("Tenant isolation check: the quarterly numbers for the northern region are "
              "confidential and must never leak to another caller of this server, ever. "
              "Nor may anyone learn from the time to the first token or from the count of "
              "cached prompt tokens how close a guess of this text came to the truth.")

    def cached(token, client_target=target) -> int:
        with Client(client_target, token=token, timeout=60) as c:
            reply = c.generate(prompt, max_tokens=1, temperature=0.0)
            assert reply.usage.prompt_tokens > 32  # spans several full 16-token blocks
            return reply.usage.cached_prompt_tokens

    assert cached("tok-a") == 0
    assert cached("tok-b") == 0                             # another tenant: nothing
    assert cached(None, f"127.0.0.1:{serving.plain.port}") == 0  # nor the open server
    assert cached("tok-a") >= 32                            # its own blocks, reused
    assert cached("tok-b") >= 32


# ---- admission queue and engine failure (scripted engine: deterministic timing) ----
def test_full_admission_queue_is_resource_exhausted():
    engine = ScriptedEngine()
    s = Serving(engine, max_queue_size=2)
    try:
        server = s.add_server()
        engine.gate.clear()  # the loop blocks inside step(): nothing leaves the queue
        with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
            queued = [c.stub.Generate.future(
                pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[i + 1]),
                                   sampling=pb.SamplingParams(max_tokens=3)), timeout=30)
                for i in range(2)]
            deadline = time.monotonic() + 10
            while s.stats().num_queued < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            err = rpc_error(c.generate, [9], max_tokens=3)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue" in err.details()
            engine.gate.set()
            assert [list(f.result().completions[0].token_ids) for f in queued] == \
                [[1, 2, 3], [2, 3, 4]]
            assert list(c.generate([9], max_tokens=2).completions[0].token_ids) == [9, 10]
    finally:
        engine.gate.set()
        s.close()


def test_engine_failure_is_internal_and_not_serving(caplog):
    """A real engine whose forward pass fails like a device error would."""
    llm = LLMEngine(EngineConfig(**ENGINE))
    s = Serving(llm)
    try:
        server = s.add_server()
        armed, real_execute = threading.Event(), llm.runner.execute

        def execute(batch):
            if armed.is_set():
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_execute(batch)

        llm.runner.execute = execute
        with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            call = c.stream_generate("Hello", max_tokens=200, ignore_eos=True)
            next(call)
            armed.set()
            err = rpc_error(lambda: call)
            assert err.code() == grpc.StatusCode.INTERNAL
            assert "illegal memory" not in err.details() and "Traceback" not in err.details()
            assert len(err.details()) < 100
            deadline = time.monotonic() + 5
            while health_status(c.channel) != NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health_status(c.channel) == NOT_SERVING
            assert health_status(c.channel, SERVICE) == NOT_SERVING
            err = rpc_error(c.generate, "Hello", max_tokens=2)
            assert err.code() == grpc.StatusCode.INTERNAL
        assert "illegal memory access" in caplog.text  # the details go to the log
    finally:
        s.close()


# ---- the CLI process: serve, client, SIGTERM drain ---------------------------------
# What the `pagedserve` console script runs.
PAGEDSERVE = [sys.executable, "-c", "import sys; from pagedserve.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_health(target: str, want: int, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"server exited early: {proc.stdout.read()}")
            try:
                if health_status(channel) == want:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"health never became {want}")


def test_sigterm_drains_in_flight_requests(tmp_path):
    port, grace = _free_port(), 4
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*PAGEDSERVE, "serve", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--num-kv-blocks", "80", "--max-model-len", "512",
         "--swap-space-gb", "0.05", "--shutdown-grace-period", str(grace),
         "--disable-tracing", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_health(target, SERVING_STATUS, 120, proc)
        cli = subprocess.run(
            [*PAGEDSERVE, "client", "generate", "The sky is",
             "--target", target, "--max-tokens", "5", "--temperature", "0", "--stream"],
            capture_output=True, text=True, timeout=60)
        with Client(target, timeout=60) as c:
            want = c.generate("The sky is", max_tokens=5, temperature=0.0)
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout.strip() == want.completions[0].text.strip()

            short = c.stream_generate("One", max_tokens=8, ignore_eos=True)
            long = c.stream_generate("Two", max_tokens=480, ignore_eos=True)
            short_tokens = list(next(short).token_ids)
            next(long)
            proc.send_signal(signal.SIGTERM)
            _wait_health(target, NOT_SERVING, 2)
            err = rpc_error(c.generate, "Three", max_tokens=2)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
            rest = list(short)  # the in-flight request finishes within the grace period
            assert len(short_tokens) + sum(len(m.token_ids) for m in rest) == 8
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            err = rpc_error(lambda: long)  # this one cannot: aborted with a clear status
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "grace period" in err.details()
        assert proc.wait(grace + 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
