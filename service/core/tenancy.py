"""Who is calling: the tenant and role of the current request, carried in a context variable.

The edge (`service.server.auth`) authenticates each call and sets `CALLER` for the task that runs it; the core
reads it where ownership and quotas are decided (`sessions.SessionManager`), so no core signature carries it
and every RPC, unary or streaming, native or KServe, is covered by the one lookup. Tasks the core spawns for a
call copy the context, so they act for the same caller.

With authentication off every call is `LOCAL`: one tenant (the empty name) with the admin role.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from service.errors import PermissionDenied

ADMIN = "admin"
USER = "user"
ROLES = (USER, ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its tenant (owner of sessions) and role (`user` or `admin`)."""

    tenant: str
    role: str = USER
    key_id: str = ""  # the API key's name, for logs


LOCAL = Principal("", ADMIN, "local")
CALLER: ContextVar[Principal] = ContextVar("rnnserve_caller", default=LOCAL)


def caller() -> Principal:
    """Return the principal of the current request."""
    return CALLER.get()


def tenant() -> str:
    """Return the tenant of the current request."""
    return CALLER.get().tenant


def require_admin(what: str) -> None:
    """Refuse with PERMISSION_DENIED unless the caller has the admin role."""
    p = CALLER.get()
    if p.role != ADMIN:
        raise PermissionDenied(f"{what} needs the admin role; API key {p.key_id!r} has role {p.role!r}")
