"""ServerConfig: the gRPC server's own settings (the engine's live in EngineConfig).

Everything a configuration problem can be (a bad value, an unreadable token file, a
certificate that does not parse) raises ConfigError here, before any port opens, so
`pagedserve serve` can end with one line and exit code 2.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

# The tenant of a token given without a name (a bare token, PAGEDSERVE_AUTH_TOKEN).
DEFAULT_TENANT = "default"


class ConfigError(ValueError):
    """A server setting that cannot work; the message names it."""


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051                 # 0 picks a free port (tests)
    metrics_port: int = 9464
    metrics_host: str | None = None   # None: the same address as host
    metrics_tenant_label: bool = False  # per-request metrics carry a `tenant` label
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None   # set: clients must present a cert it signed
    auth_token: str | None = None           # one bare token: tenant "default"
    # token -> tenant (from --auth-token-file); merged with auth_token
    auth_tokens: dict[str, str] = field(default_factory=dict)
    max_queue_size: int = 1024        # accepted requests not yet producing output
    max_n: int = 16                   # cap on n and beam_width
    max_stop_strings: int = 16
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace_period: float = 30.0
    # After the engine fails: seconds health stays NOT_SERVING (in-flight callers get
    # INTERNAL) before the process stops and exits non-zero for its restart.
    engine_failure_exit_delay: float = 5.0
    # A step running longer than this turns health NOT_SERVING until steps resume.
    step_timeout: float = 120.0
    disable_tracing: bool = False

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file: {path}")
        if self.tls:
            check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("auth_token must not be empty")
        for token, tenant in self.auth_tokens.items():
            if not token or not tenant:
                raise ConfigError("auth_tokens: tenant and token must not be empty")
        if self.auth_token is not None and self.auth_token in self.auth_tokens:
            raise ConfigError("auth_token is also in auth_tokens: each token names one tenant")
        for name in ("max_queue_size", "max_n", "max_stop_strings", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shutdown_grace_period", "engine_failure_exit_delay"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.step_timeout < float("inf"):
            raise ConfigError(f"step_timeout must be > 0 seconds, got {self.step_timeout}")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def tenants_by_token(self) -> dict[str, str]:
        """Every accepted token and its tenant; empty when authentication is off."""
        tokens = dict(self.auth_tokens)
        if self.auth_token is not None:
            tokens[self.auth_token] = DEFAULT_TENANT
        return tokens

    @property
    def metrics_bind_host(self) -> str:
        return self.host if self.metrics_host is None else self.metrics_host


def check_tls_files(cert_file: str, key_file: str, ca_file: str | None) -> None:
    """Load the PEM files the way an OpenSSL server would, so a garbage or mismatched
    certificate is a clear error now, not a bind failure with gRPC's log lines."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls_cert_file/tls_key_file ({cert_file}, {key_file}): not a "
                          f"PEM certificate and its matching private key ({_reason(e)})") from None
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls_client_ca_file ({ca_file}): not a PEM CA bundle "
                              f"({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


def read_token_file(path: str) -> str:
    """One bare token (the client's file): the content without surrounding whitespace."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"token file {path}: {_reason(e)}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def read_tenant_tokens(path: str) -> dict[str, str]:
    """The server's token file: `tenant:token` lines -> {token: tenant}.

    A line splits at its first ':'; a line without one is a bare token of the tenant
    "default". Blank lines and lines starting with '#' are skipped. A tenant may have
    several tokens (rotation); a token may name only one tenant.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"auth_token_file {path}: {_reason(e)}") from None
    tokens: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, token = line.partition(":")
        if not sep:
            tenant, token = DEFAULT_TENANT, line
        tenant, token = tenant.strip(), token.strip()
        if not tenant or not token:
            raise ConfigError(f"auth_token_file {path}, line {number}: expected "
                              f"'tenant:token' with neither part empty")
        if token in tokens:
            # Never echo a token: the line numbers are enough to find it.
            raise ConfigError(f"auth_token_file {path}, line {number}: the same token as "
                              f"line {first_line[token]}; each token names one tenant")
        tokens[token], first_line[token] = tenant, number
    if not tokens:
        raise ConfigError(f"auth_token_file {path} holds no token")
    return tokens
