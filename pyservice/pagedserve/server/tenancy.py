"""Who is calling, and the prefix-cache salt that keeps callers' cached blocks apart.

The auth interceptor sets `current_tenant` for the duration of one RPC (a ContextVar:
each RPC runs in its own task, so one caller's value never leaks into another's).
Prompts hash under a salt derived from the tenant (and the request's optional
`cache_salt`) with a key drawn at process start, so no tenant can hit, time or count
another's cached blocks, and nobody can compute a salt that collides on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from contextvars import ContextVar

# None: authentication is off, every caller is the same (anonymous) tenant.
current_tenant: ContextVar[str | None] = ContextVar("pagedserve_tenant", default=None)

_KEY = secrets.token_bytes(32)


def cache_salt(tenant: str | None, request_salt: str = "") -> int:
    """The 64-bit salt prompts of this tenant (and request salt) hash under; 0 (the
    shared cache of unauthenticated callers) when neither is given."""
    if tenant is None and not request_salt:
        return 0
    message = f"{tenant or ''}\x00{request_salt}".encode()
    digest = hmac.new(_KEY, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") or 1  # never the shared salt 0
