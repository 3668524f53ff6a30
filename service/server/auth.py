"""Authentication at the edge: API keys (hashed at rest) -> tenant and role, checked on every RPC.

Every call of the native and KServe APIs carries the metadata `authorization: Bearer <API key>`. The key is
looked up by its SHA-256 in the keys file; the call then runs as that key's `Principal` (tenant, role), which
`AuthInterceptor` puts in `service.core.tenancy.CALLER` for the task that serves the call. Health checking and
reflection stay open (probes and tooling carry no key). Admin RPCs (`ADMIN_METHODS`: repository reloads and
anything else that changes the server) need the `admin` role.

Keys file (YAML, mounted from a Kubernetes Secret; re-read when it changes):

    keys:
      - id: acme-ci              # a name for logs and PERMISSION_DENIED messages
        sha256: 5e884898da28...  # hex SHA-256 of the key (the key itself is never stored)
        tenant: acme
        role: user               # user | admin
    tenants:                     # optional per-tenant quotas (0 or absent = the server default)
      acme: {max_sessions: 1000, max_state_bytes: 268435456, max_steps_per_s: 2000}

A fast hash is right here because keys are random 256-bit tokens (`new-key` below), not passwords: there is
nothing to guess, and a salted slow hash (scrypt) would cost milliseconds on every call.

    python -m service.server.auth new-key --tenant acme [--role admin] [--id NAME] >> keys.yaml
prints a fresh key once (to stderr) and the YAML entry holding only its hash (to stdout).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio

from service.config import Settings
from service.core.admission import Quota
from service.core.tenancy import ADMIN, CALLER, LOCAL, ROLES, Principal
from service.errors import PermissionDenied, ServeError, Unauthenticated

_log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Open to every caller: probes and tooling carry no credential, and these reveal nothing about sessions.
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# RPCs that change the server for everyone: the admin role only.
ADMIN_METHODS = frozenset(
    {
        "/rnnserve.v1.RecurrentService/ReloadRepository",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
        "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
        "/inference.GRPCInferenceService/TraceSetting",
        "/inference.GRPCInferenceService/LogSettings",
    }
)
RELOAD_EVERY_S = 1.0
_QUOTA_FIELDS = ("max_sessions", "max_state_bytes", "max_steps_per_s")


def key_hash(key: str) -> str:
    """Hex SHA-256 of an API key: what the keys file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeysFile:
    """A parsed keys file: principals by key hash, and per-tenant quotas."""

    principals: dict[str, Principal]
    quotas: dict[str, Quota]


def _parse_key(entry: Any, i: int, where: str) -> tuple[str, Principal]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with sha256, tenant, role")
    digest = str(entry.get("sha256", "")).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (the key's SHA-256)")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"{where}: tenant must be a non-empty string")
    role = entry.get("role", "user")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
    return digest, Principal(tenant, role, str(entry.get("id", f"keys[{i}]")))


def parse_keys(text: str, source: str = "keys file") -> KeysFile:
    """Parse and validate a keys file; `ValueError` says what is wrong and where."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ValueError(f"{source}: expected a mapping with a list 'keys'")
    principals: dict[str, Principal] = {}
    for i, entry in enumerate(data.get("keys") or []):
        digest, principal = _parse_key(entry, i, f"{source}: keys[{i}]")
        if digest in principals:
            raise ValueError(f"{source}: keys[{i}]: the same key hash appears twice")
        principals[digest] = principal
    quotas: dict[str, Quota] = {}
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise ValueError(f"{source}: 'tenants' must map tenant names to quotas")
    for name, q in tenants.items():
        if not isinstance(q, dict) or set(q) - set(_QUOTA_FIELDS):
            raise ValueError(f"{source}: tenants.{name}: expected some of {list(_QUOTA_FIELDS)}")
        values = {k: q.get(k, 0) for k in _QUOTA_FIELDS}
        if any(not isinstance(v, int | float) or v < 0 for v in values.values()):
            raise ValueError(f"{source}: tenants.{name}: quotas must be numbers >= 0")
        quotas[str(name)] = Quota(
            int(values["max_sessions"]), int(values["max_state_bytes"]), float(values["max_steps_per_s"])
        )
    return KeysFile(principals, quotas)


class KeyRing:
    """The keys file in memory, re-read (at most once a second) when its modification time changes."""

    def __init__(self, path: Path, on_quotas: Callable[[dict[str, Quota]], None] | None = None) -> None:
        self.path = path
        self._on_quotas = on_quotas
        self._mtime = -1.0
        self._checked = 0.0
        self.keys = self._load()

    def _load(self) -> KeysFile:
        try:
            stat = self.path.stat()
            keys = parse_keys(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot load API keys: {exc}") from exc
        self._mtime = stat.st_mtime
        if not keys.principals:
            _log.warning("keys file %s holds no keys: every authenticated call will be refused", self.path)
        if self._on_quotas is not None:
            self._on_quotas(keys.quotas)
        return keys

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime == self._mtime:
                return
            self.keys = self._load()
            _log.info("API keys reloaded from %s (%d keys)", self.path, len(self.keys.principals))
        except (OSError, SystemExit) as exc:  # a half-written Secret update: keep the keys we have
            _log.warning("API keys file changed but cannot be loaded (%s); keeping the previous keys", exc)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> tuple[Principal | None, str]:
        """Return (principal, "") for a valid credential, else (None, reason)."""
        self._maybe_reload()
        value = None
        for k, v in metadata or ():
            if k == AUTH_HEADER:
                value = v
                break
        if value is None:
            return None, "missing"
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, "malformed"
        principal = self.keys.principals.get(key_hash(token))
        return (principal, "") if principal is not None else (None, "unknown")


_MESSAGES = {
    "missing": "this server needs an API key: send the metadata 'authorization: Bearer <key>'",
    "malformed": "malformed authorization metadata; expected 'Bearer <key>'",
    "unknown": "unknown API key (revoked, mistyped or for another server)",
}


def _refusing(handler: Any, exc: ServeError) -> Any:
    """Return the same kind of handler, failing every call with `exc` (the outer interceptor maps it)."""

    async def refuse(request: Any, context: Any) -> Any:
        raise exc

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: refuse})
    return handler


class AuthInterceptor(aio.ServerInterceptor):
    """Authenticate every call but health/reflection; run it as its principal (see the module docstring).

    Install it inside `ErrorMappingInterceptor` (after it in the server's list) so refusals are typed errors
    that get mapped and counted like any other. With `keys` None (auth none) every call runs as `LOCAL`.
    """

    def __init__(self, keys: KeyRing | None, on_failure: Callable[[str], None] | None = None) -> None:
        self.keys = keys
        self._on_failure = on_failure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Decide who the caller is before the handler runs; the context variable lives for this call."""
        method = handler_call_details.method
        if self.keys is None or method.startswith(OPEN_PREFIXES):
            CALLER.set(LOCAL)
            return await continuation(handler_call_details)
        principal, reason = self.keys.authenticate(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if principal is None:
            self._failed(reason)
            return _refusing(handler, Unauthenticated(_MESSAGES[reason]))
        if method in ADMIN_METHODS and principal.role != ADMIN:
            self._failed("role")
            name = method.rsplit("/", 1)[-1]
            return _refusing(
                handler,
                PermissionDenied(
                    f"{name} needs the admin role; API key {principal.key_id!r} of tenant "
                    f"{principal.tenant!r} has role {principal.role!r}"
                ),
            )
        CALLER.set(principal)
        return handler

    def _failed(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)


def interceptor_for(settings: Settings, engine: Any) -> AuthInterceptor | None:
    """Build the server's authentication interceptor as the settings say (keys-file quotas: admission)."""
    metrics = engine.metrics
    if settings.auth == "none":
        return None
    assert settings.api_keys_file is not None  # the settings validator requires it
    ring = KeyRing(settings.api_keys_file, engine.session_manager.admission.set_quotas)
    return AuthInterceptor(ring, lambda reason: metrics.auth_failures.labels(reason).inc())


def _new_key(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(32)
    entry = {
        "id": args.id or f"{args.tenant}-{key_hash(key)[:8]}",
        "sha256": key_hash(key),
        "tenant": args.tenant,
        "role": args.role,
    }
    print(
        f"API key for tenant {args.tenant!r} (shown once, store it in a secret manager):\n{key}",
        file=sys.stderr,
    )
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def _hash(args: argparse.Namespace) -> int:
    print(key_hash(sys.stdin.readline().strip()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m service.server.auth new-key|hash`: make keys-file entries."""
    parser = argparse.ArgumentParser(prog="python -m service.server.auth", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "new-key", help="make a random key; print it (stderr) and its keys-file entry (stdout)"
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", choices=ROLES, default="user")
    p.add_argument("--id", default=None, help="name of the key in logs (default tenant-<hash prefix>)")
    p.set_defaults(func=_new_key)
    p = sub.add_parser("hash", help="print the SHA-256 of a key read from stdin")
    p.set_defaults(func=_hash)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
