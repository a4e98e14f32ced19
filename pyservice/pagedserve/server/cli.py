"""`pagedserve serve` and `pagedserve client generate`, hooked into pagedserve.cli.

Every flag also reads PAGEDSERVE_<FLAG_IN_UPPER_SNAKE_CASE>. Bearer tokens come from a
file of `tenant:token` lines (a mounted Kubernetes secret; a bare token is the tenant
"default") or, one bare token, from PAGEDSERVE_AUTH_TOKEN.

Exit status of `serve`: 0 after SIGTERM/SIGINT, 1 when the engine failed (so the
orchestrator restarts it), 2 for a configuration problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def _flag(parser: Any, flag: str, default: Any, kind: Callable = str, help: str = "") -> None:
    from pagedserve.cli import add_flag  # PAGEDSERVE_* defaults, as every other flag

    if kind is bool:
        add_flag(parser, flag, action="store_true", default=default, help=help)
    else:
        add_flag(parser, flag, type=kind, default=default, help=help)


def add_serve_parser(subparsers: Any) -> None:
    """Hook called by pagedserve.cli.build_parser."""
    from pagedserve.cli import add_engine_flags

    p = subparsers.add_parser(
        "serve", help="run the gRPC server",
        description="Serve TextGeneration over gRPC (health and reflection included). "
                    "SIGTERM drains: in-flight requests get the grace period to finish.")
    add_server_arguments(p)
    add_engine_flags(p)
    p.set_defaults(func=run_serve)


def add_client_parser(subparsers: Any) -> None:
    """Hook called by pagedserve.cli.build_parser."""
    p = subparsers.add_parser("client", help="call a running server",
                              description="Call a running pagedserve server.")
    add_client_arguments(p)
    p.set_defaults(func=run_client)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (engine flags are added by pagedserve.cli)."""
    g = parser.add_argument_group("server")
    _flag(g, "--host", "0.0.0.0", help="address to listen on")
    _flag(g, "--port", 50051, int, help="gRPC port")
    _flag(g, "--metrics-port", 9464, int, help="Prometheus metrics port (0: off)")
    _flag(g, "--metrics-host", None, help="address the metrics endpoint listens on "
          "(default: --host)")
    _flag(g, "--metrics-tenant-label", False, bool,
          help="label per-request metrics with the caller's tenant")
    _flag(g, "--tls-cert-file", None, help="server certificate (PEM): enables TLS")
    _flag(g, "--tls-key-file", None, help="server private key (PEM)")
    _flag(g, "--tls-client-ca-file", None,
          help="CA bundle (PEM) for client certificates: enables mutual TLS")
    _flag(g, "--auth-token-file", None,
          help="file of 'tenant:token' lines (a bare token: tenant 'default'); clients "
               "send 'authorization: Bearer <token>' (or one token in PAGEDSERVE_AUTH_TOKEN)")
    _flag(g, "--max-queue-size", 1024, int,
          help="requests waiting for the engine before RESOURCE_EXHAUSTED")
    _flag(g, "--max-n", 16, int, help="cap on n and beam_width per request")
    _flag(g, "--max-stop-strings", 16, int, help="cap on stop strings per request")
    _flag(g, "--max-message-bytes", 4 * 1024 * 1024, int,
          help="largest request message accepted (bytes)")
    _flag(g, "--shutdown-grace-period", 30.0, float,
          help="seconds in-flight requests get to finish after SIGTERM (a second "
               "signal ends the drain at once)")
    _flag(g, "--step-timeout", 120.0, float,
          help="seconds one engine step may run before health turns NOT_SERVING")
    _flag(g, "--engine-failure-exit-delay", 5.0, float,
          help="seconds the server stays up NOT_SERVING after the engine failed, "
               "before it exits with status 1")
    _flag(g, "--disable-tracing", False, bool, help="turn OpenTelemetry tracing off")
    _flag(g, "--log-level", "INFO", help="DEBUG, INFO, WARNING or ERROR")


def server_config_from_args(args: argparse.Namespace):
    from pagedserve.server.config import ServerConfig, read_tenant_tokens

    token, tokens = os.environ.get("PAGEDSERVE_AUTH_TOKEN") or None, {}
    if args.auth_token_file:  # the file wins over the variable
        token, tokens = None, read_tenant_tokens(args.auth_token_file)
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, metrics_tenant_label=args.metrics_tenant_label,
        tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file, auth_token=token, auth_tokens=tokens,
        max_queue_size=args.max_queue_size, max_n=args.max_n,
        max_stop_strings=args.max_stop_strings, max_message_bytes=args.max_message_bytes,
        shutdown_grace_period=args.shutdown_grace_period,
        engine_failure_exit_delay=args.engine_failure_exit_delay,
        step_timeout=args.step_timeout, disable_tracing=args.disable_tracing)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (0) or an engine failure (1)."""
    from pagedserve.cli import engine_config_from_args
    from pagedserve.server.app import serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Bad settings raise ValueError (ConfigError); pagedserve.cli prints it in one line.
    config = server_config_from_args(args)
    engine_config = engine_config_from_args(args)
    if engine_config.tensor_parallel_size > 1:
        from pagedserve.distributed import serve_as_worker

        if serve_as_worker(engine_config):  # a worker pod/rank: no gRPC server here
            return 0

    def make_engine():
        from pagedserve.engine.llm_engine import LLMEngine

        engine = LLMEngine(engine_config)
        freeze_startup_heap()
        return engine

    return asyncio.run(serve(config, make_engine))


def freeze_startup_heap() -> None:
    """Takes what is alive once the serving engine is up (imported modules, the model,
    the tokenizer: a few hundred thousand objects) out of the cyclic garbage
    collector's reach for the life of the process. Steps allocate enough for a full
    collection every few hundred steps, and one that walks all those objects stalls the
    step for 0.1-0.2 s while the GPU idles; none of them become garbage while the
    server runs. Only the serving process does this: it keeps its one engine until it
    exits, whereas a frozen engine in a library user's process could never be
    collected (frozen cycles are not). Garbage is collected first, so no cycle is
    frozen; frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """`client` subcommands; the parser is the `client` subcommand's."""
    from pagedserve.cli import add_flag

    sub = parser.add_subparsers(dest="client_command", required=True)
    gen = sub.add_parser("generate", help="generate text from a running server")
    gen.add_argument("prompt")
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    _flag(gen, "--target", "localhost:50051", help="server host:port")
    _flag(gen, "--max-tokens", 64, int)
    _flag(gen, "--temperature", None, float)
    _flag(gen, "--top-p", None, float)
    _flag(gen, "--top-k", None, int)
    # Not --seed's dest: PAGEDSERVE_SEED belongs to the engine.
    add_flag(gen, "--seed", dest="sampling_seed", type=int, default=None,
             help="sampling seed")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE",
                            help="the output is JSON conforming to the JSON Schema in FILE")
    constraint.add_argument("--json-object", action="store_true", default=None,
                            help="the output is a JSON object")
    constraint.add_argument("--regex", help="the output matches this regular expression")
    constraint.add_argument("--grammar", metavar="FILE",
                            help="the output is a sentence of the EBNF (GBNF) grammar in FILE")
    constraint.add_argument("--choice", action="append",
                            help="the output is one of the --choice strings (repeatable)")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as one user message through the chat template")
    _flag(gen, "--timeout", None, float, help="deadline in seconds")
    _flag(gen, "--token-file", None, help="bearer token file (or PAGEDSERVE_AUTH_TOKEN)")
    _flag(gen, "--tls", False, bool, help="use TLS with the system's root certificates")
    _flag(gen, "--tls-ca-file", None, help="CA certificate (PEM) that signed the server's")
    _flag(gen, "--client-cert-file", None, help="client certificate (PEM) for mutual TLS")
    _flag(gen, "--client-key-file", None, help="client private key (PEM) for mutual TLS")


def _constraint(args: argparse.Namespace) -> dict:
    from pagedserve.cli import read_constraint_file

    if args.json_schema is not None:
        return {"json_schema": read_constraint_file("--json-schema", args.json_schema)}
    if args.grammar is not None:
        return {"grammar": read_constraint_file("--grammar", args.grammar)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    return {}


def run_client(args: argparse.Namespace) -> int:
    import grpc

    from pagedserve.client import Client
    from pagedserve.server.config import read_token_file

    token = os.environ.get("PAGEDSERVE_AUTH_TOKEN") or None
    if args.token_file:
        token = read_token_file(args.token_file)
    sampling = {"max_tokens": args.max_tokens, "stop": args.stop}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    if args.sampling_seed is not None:
        sampling["seed"] = args.sampling_seed
    try:
        sampling.update(_constraint(args))
    except ValueError as exc:
        print(f"pagedserve client: {exc}", file=sys.stderr)
        return 2
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    client = Client(args.target, token=token, tls=args.tls, root_certificates=args.tls_ca_file,
                    client_cert=args.client_cert_file, client_key=args.client_key_file,
                    timeout=args.timeout)
    try:
        with client:
            if args.stream:
                for message in client.stream_generate(prompt, **sampling):
                    print(message.text, end="", flush=True)
                print()
            else:
                reply = client.generate(prompt, **sampling)
                print(reply.completions[0].text)
    except grpc.RpcError as exc:
        print(f"pagedserve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0
