"""The server against hostile callers and bad days: tenants from the token file,
request bytes that do not parse, one-line start-up errors, a stuck step (watchdog), an
engine failure that ends the process, and a second shutdown signal.

In-process tests serve a scripted engine on loopback (deterministic, no model); the
process tests run `pagedserve serve` with that engine (tests/scripted_serve.py).
Nothing waits on a sleep: every wait polls for a state with a generous timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve import cli
from pagedserve.client import Client
from pagedserve.observability.metrics import Metrics
from pagedserve.observability.observer import Observability
from pagedserve.server.app import Server
from pagedserve.server.config import ConfigError, ServerConfig, read_tenant_tokens
from pagedserve.server.watchdog import StepWatchdog
from pagedserve.v1 import generate_pb2 as pb
from server_fixtures import ScriptedEngine, Serving, make_pki

SERVICE = "pagedserve.v1.TextGeneration"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPTED_SERVE = [sys.executable, os.path.join(TESTS, "scripted_serve.py")]
PAGEDSERVE = [sys.executable, "-c", "import sys; from pagedserve.cli import main; sys.exit(main())"]


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout}s")


def health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def metric_samples(metrics: Metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_with(serving: Serving, observability=None, **settings) -> Server:
    """A Server for `serving`'s engine, with observability (which Serving.add_server
    does not take)."""
    server = Server(ServerConfig(host="127.0.0.1", port=0, **settings), observability)

    async def up() -> None:
        await server.start()
        await server.attach(serving.engine)

    serving.loop.run(up())
    serving.servers.append(server)
    return server


# ---- the token file --------------------------------------------------------------------
def test_token_file_names_tenants(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# tenants of the staging cluster\n\nalice:tok-a\n  bob : tok:b:c  \n"
                    "bare-token\nalice:tok-a2\n")
    assert read_tenant_tokens(str(path)) == {
        "tok-a": "alice", "tok:b:c": "bob", "bare-token": "default", "tok-a2": "alice"}


@pytest.mark.parametrize("content,message", [
    ("", "holds no token"),
    ("# only a comment\n\n", "holds no token"),
    ("alice:tok\nbob:tok\n", "line 2: the same token as line 1"),
    (":tok\n", "line 1: expected 'tenant:token'"),
    ("alice:\n", "line 1: expected 'tenant:token'"),
])
def test_bad_token_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_tenant_tokens(str(path))
    assert cli.main(["serve", "--auth-token-file", str(path), "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pagedserve serve: error: auth_token_file")
    assert message in err and "tok" not in err.replace("token", "")  # no token echoed


@pytest.mark.parametrize("argv,message", [
    (["--auth-token-file", "/nonexistent/tokens"], "No such file or directory"),
    (["--step-timeout", "0"], "step_timeout must be > 0 seconds"),
    (["--engine-failure-exit-delay", "-1"], "engine_failure_exit_delay must be >= 0"),
    (["--metrics-port", "70000"], "metrics_port must be in [0, 65535]"),
    (["--port", "x"], "argument --port: invalid int value: 'x'"),
])
def test_bad_serve_settings_are_one_line_errors(capsys, argv, message):
    try:
        status = cli.main(["serve", *argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pagedserve serve: error: ")
    assert message in err and "Traceback" not in err


# ---- tenants ---------------------------------------------------------------------------
TENANT_TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture
def scripted():
    s = Serving(ScriptedEngine())
    yield s
    s.close()


def test_each_token_speaks_for_its_tenant(scripted):
    """The tenant reaches the handler (here: the per-request metrics, labelled on
    request) for unary and streaming calls; unknown tokens are refused."""
    metrics = Metrics(tenant_label=True)
    server = serve_with(scripted, Observability(None, metrics), auth_tokens=TENANT_TOKENS,
                        auth_token="bare-token")
    target = f"127.0.0.1:{server.port}"
    for token, n in (("tok-alice", 2), ("tok-bob", 1), ("bare-token", 1)):
        with Client(target, token=token, timeout=30) as c:
            for _ in range(n):
                assert list(c.generate([1, 2], max_tokens=3).completions[0].token_ids) == \
                    [3, 4, 5]
            assert [len(m.token_ids) for m in c.stream_generate([7], max_tokens=2)] != []
    for token in (None, "tok-alic", "tok-alicex", "tok-alicetok-bob", "default"):
        with Client(target, token=token, timeout=10) as c:
            assert rpc_error(c.generate, [1], max_tokens=1).code() == \
                grpc.StatusCode.UNAUTHENTICATED
    s = metric_samples(metrics)
    finished = {labels: v for (name, labels), v in s.items()
                if name == "pagedserve:requests_finished_total" and v}
    assert finished == {
        (("finish_reason", "length"), ("tenant", "alice")): 3.0,
        (("finish_reason", "length"), ("tenant", "bob")): 2.0,
        (("finish_reason", "length"), ("tenant", "default")): 2.0}
    assert s[("pagedserve:generation_tokens_total", (("tenant", "alice"),))] == 2 * 3 + 2


def test_tenant_label_only_when_asked(scripted):
    metrics = Metrics()
    server = serve_with(scripted, Observability(None, metrics), auth_tokens=TENANT_TOKENS)
    with Client(f"127.0.0.1:{server.port}", token="tok-alice", timeout=30) as c:
        c.generate([1], max_tokens=2)
    s = metric_samples(metrics)
    assert not any("tenant" in dict(labels) for _, labels in s)
    assert s[("pagedserve:requests_finished_total", (("finish_reason", "length"),))] == 1
    # Without authentication the label says so.
    labelled = Metrics(tenant_label=True)
    open_server = serve_with(scripted, Observability(None, labelled))
    with Client(f"127.0.0.1:{open_server.port}", timeout=30) as c:
        c.generate([1], max_tokens=2)
    assert metric_samples(labelled)[("pagedserve:generation_tokens_total",
                                     (("tenant", "anonymous"),))] == 2


# ---- request bytes that do not parse ---------------------------------------------------
UNPARSEABLE = {
    "invalid UTF-8 in prompt": b"\x0a\x02\xff\xfe",
    "truncated": b"\x0a\x10ab",
    "random": b"\xff\xff\xff\xff\xff",
    "bad UTF-8 in a stop string": b"\x1a\x04\x5a\x02\xc3\x28",
}


def _raw_calls(channel):
    method = f"/{SERVICE}/"
    return {"Generate": channel.unary_unary(method + "Generate"),
            "StreamGenerate": channel.unary_stream(method + "StreamGenerate"),
            "GetModelInfo": channel.unary_unary(method + "GetModelInfo")}


def test_unparseable_requests_are_invalid_argument_without_a_log_line(scripted, caplog):
    for data in UNPARSEABLE.values():  # the cases really do not parse
        with pytest.raises(DecodeError):
            pb.GenerateRequest.FromString(data)
    metrics = Metrics()
    server = serve_with(scripted, Observability(None, metrics))
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        calls = _raw_calls(channel)
        for name in ("Generate", "StreamGenerate"):
            for data in UNPARSEABLE.values():
                err = rpc_error(calls[name], data, timeout=10)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.details() == "request is not a valid GenerateRequest"
        err = rpc_error(calls["GetModelInfo"], b"\xff\xff", timeout=10)
        assert (err.code(), err.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid GetModelInfoRequest")
        # The same bytes, well formed, still work.
        ok = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[4]),
                                sampling=pb.SamplingParams(max_tokens=2))
        reply = pb.GenerateResponse.FromString(calls["Generate"](ok.SerializeToString(),
                                                                 timeout=30))
        assert list(reply.completions[0].token_ids) == [4, 5]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert metric_samples(metrics)[("pagedserve:unparseable_requests_total", ())] == 2 * 4 + 1


def test_authentication_comes_before_parsing(scripted):
    server = serve_with(scripted, auth_tokens=TENANT_TOKENS)
    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target) as channel:
        calls = _raw_calls(channel)
        for name in ("Generate", "StreamGenerate"):
            for data in UNPARSEABLE.values():
                for metadata in ((), (("authorization", "Bearer nope"),)):
                    err = rpc_error(calls[name], data, metadata=metadata, timeout=10)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, name
                err = rpc_error(calls[name], data, timeout=10,
                                metadata=(("authorization", "Bearer tok-bob"),))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- watchdog ----------------------------------------------------------------------------
class HangingEngine(ScriptedEngine):
    """A step that produces token `hang_at` + 1 of a request blocks until released."""

    def __init__(self, hang_at: int) -> None:
        super().__init__()
        self.hang_at = hang_at
        self.hanging = threading.Event()
        self.release = threading.Event()

    def step(self):
        if not self.release.is_set() and any(
                len(r["out"]) == self.hang_at for r in self.requests.values()):
            self.hanging.set()
            self.release.wait()
        return super().step()


def test_a_stuck_step_turns_health_not_serving_until_steps_resume(caplog):
    engine = HangingEngine(hang_at=3)
    s = Serving(engine)
    try:
        server = s.add_server(step_timeout=0.2)
        caplog.set_level(logging.ERROR, logger="pagedserve.server.watchdog")
        with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            assert health(c.channel) == SERVING
            stream = c.stream_generate([5], max_tokens=8, request_id="stuck-1")
            first = next(stream)  # the request has left the queue (a slow reader may
            # see up to the three tokens before the hang in this one message)
            wait_for(lambda: engine.hanging.is_set() and health(c.channel) == NOT_SERVING
                     and "stuck-1" in caplog.text, what="NOT_SERVING naming the request")
            assert health(c.channel, SERVICE) == NOT_SERVING
            engine.release.set()
            rest = [t for m in stream for t in m.token_ids]
            assert list(first.token_ids) + rest == [5, 6, 7, 8, 9, 10, 11, 12]
            wait_for(lambda: health(c.channel) == SERVING and health(c.channel, SERVICE)
                     == SERVING, what="SERVING again")
            assert list(c.generate([1], max_tokens=2).completions[0].token_ids) == [1, 2]
    finally:
        engine.release.set()
        s.close()


class FakeEngine:
    def __init__(self) -> None:
        self.step_started_at = None
        self.is_healthy = True

    def running_request_ids(self):
        return ["b", "a"]


def test_watchdog_decisions_on_a_fake_clock(caplog):
    import asyncio

    engine, now, reports = FakeEngine(), [100.0], []

    async def set_healthy(ok: bool) -> None:
        reports.append(ok)

    dog = StepWatchdog(engine, 10.0, set_healthy, clock=lambda: now[0])

    async def check(at: float, started):
        now[0], engine.step_started_at = at, started
        await dog.check()

    async def scenario():
        await check(100, None)          # idle
        await check(109, 100)           # a step, within the limit
        await check(111, 100)           # past it: unhealthy, once
        await check(150, 100)
        await check(151, 150)           # a new step began: the old one returned
        await check(180, 165)           # stuck again
        engine.is_healthy = False
        await check(171, None)          # returned, but the engine has failed meanwhile

    asyncio.run(scenario())
    assert reports == [False, True, False]
    assert dog.stalled_step is None
    assert "Requests in the step: a, b" in caplog.text


# ---- the process: start-up errors, engine failure, second signal -------------------------
def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedserve serve: error: "), proc.stderr
    return lines[0]


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run([*PAGEDSERVE, "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--metrics-port", "0", "--disable-tracing"],
                              capture_output=True, text=True, timeout=120)
        line = _one_line_error(proc)
        assert f"cannot listen on 127.0.0.1:{port} for gRPC: Address already in use" in line
        proc = subprocess.run([*PAGEDSERVE, "serve", "--host", "127.0.0.1", "--port", "0",
                               "--metrics-port", str(port), "--disable-tracing"],
                              capture_output=True, text=True, timeout=120)
        line = _one_line_error(proc)
        assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in line


def test_garbage_tls_files_are_one_line_errors(tmp_path):
    pki = make_pki()
    files = {"garbage": b"-----BEGIN CERTIFICATE-----\nnot base64\n", "cert": pki.server_cert,
             "key": pki.server_key, "other_key": pki.client_key}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    base = [*PAGEDSERVE, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    for cert, key, ca, what in (("garbage", "key", None, "tls_cert_file/tls_key_file"),
                                ("cert", "garbage", None, "tls_cert_file/tls_key_file"),
                                ("cert", "other_key", None, "tls_cert_file/tls_key_file"),
                                ("cert", "key", "garbage", "tls_client_ca_file")):
        argv = [*base, "--tls-cert-file", str(tmp_path / cert), "--tls-key-file",
                str(tmp_path / key)]
        if ca:
            argv += ["--tls-client-ca-file", str(tmp_path / ca)]
        line = _one_line_error(subprocess.run(argv, capture_output=True, text=True, timeout=120))
        assert what in line, line


def _start_scripted(tmp_path, *flags: str, **env: str):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [*SCRIPTED_SERVE, "serve", "--host", "127.0.0.1", "--port", str(port),
         "--disable-tracing", *flags],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    target = f"127.0.0.1:{port}"

    def serving() -> bool:
        assert proc.poll() is None, open(tmp_path / "server.log").read()
        try:
            with grpc.insecure_channel(target) as channel:
                return health(channel) == SERVING
        except grpc.RpcError:
            return False

    wait_for(serving, 120, "SERVING")
    return proc, target


def _server_log(tmp_path) -> str:
    return (tmp_path / "server.log").read_text()


def test_engine_failure_ends_the_process_with_status_1(tmp_path):
    proc, target = _start_scripted(tmp_path, "--metrics-port", "0",
                                   "--engine-failure-exit-delay", "5",
                                   SCRIPTED_STEP_SECONDS="0.01", SCRIPTED_FAIL_TOKEN="13")
    try:
        with Client(target, timeout=60) as c:
            watch = health_pb2_grpc.HealthStub(c.channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == SERVING
            in_flight = c.stream_generate([5], max_tokens=100_000, ignore_eos=True)
            next(in_flight)
            err = rpc_error(c.generate, [13], max_tokens=2)  # its step fails
            assert err.code() == grpc.StatusCode.INTERNAL
            err = rpc_error(lambda: in_flight)
            assert err.code() == grpc.StatusCode.INTERNAL and "Traceback" not in err.details()
            assert next(watch).status == NOT_SERVING
        assert proc.wait(60) == 1
        log = _server_log(tmp_path)
        assert "engine failed; NOT_SERVING, exiting in 5s" in log
        assert "simulated device error" in log  # the cause is in the log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_signal_ends_the_drain_and_metrics_bind_their_own_host(tmp_path):
    metrics_port = free_port("127.0.0.2")
    proc, target = _start_scripted(
        tmp_path, "--metrics-host", "127.0.0.2", "--metrics-port", str(metrics_port),
        "--shutdown-grace-period", "600", SCRIPTED_STEP_SECONDS="0.01")
    try:
        # The metrics endpoint listens on --metrics-host only, not on --host.
        with urllib.request.urlopen(f"http://127.0.0.2:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"pagedserve:engine_steps" in r.read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        with Client(target, timeout=120) as c:
            long = c.stream_generate([5], max_tokens=100_000, ignore_eos=True)
            next(long)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health(c.channel) == NOT_SERVING, 30, "draining")
            assert proc.poll() is None  # 600 s of grace: still draining
            proc.send_signal(signal.SIGINT)
            err = rpc_error(lambda: long)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "aborted after a second shutdown signal" in err.details()
        assert proc.wait(60) == 0
        assert "second shutdown signal: ending the drain now" in _server_log(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
