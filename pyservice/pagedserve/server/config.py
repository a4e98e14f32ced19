"""ServerConfig: the gRPC server's own settings (the engine's live in EngineConfig)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051                 # 0 picks a free port (tests)
    metrics_port: int = 9464
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None   # set: clients must present a cert it signed
    auth_token: str | None = None           # set: calls need `authorization: Bearer <token>`
    max_queue_size: int = 1024        # accepted requests not yet producing output
    max_n: int = 16                   # cap on n and beam_width
    max_stop_strings: int = 16
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace_period: float = 30.0
    disable_tracing: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token must not be empty")
        for name in ("max_queue_size", "max_n", "max_stop_strings", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_grace_period < 0:
            raise ValueError(
                f"shutdown_grace_period must be >= 0, got {self.shutdown_grace_period}")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def read_token_file(path: str) -> str:
    """The token is the file's content without surrounding whitespace (a trailing newline)."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"auth_token_file: {path} is empty")
    return token
