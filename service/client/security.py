"""Client side of the server's security: TLS (optionally with a client certificate) and the API key.

`Credentials` says how to reach a server: plaintext or TLS (trusting a given CA, or the system roots), an
optional client certificate for mutual TLS, and an optional API key that goes with every call as the metadata
`authorization: Bearer <key>`. `Credentials.from_env()` reads `RNNSERVE_API_KEY`, `RNNSERVE_TLS_CA`,
`RNNSERVE_TLS_CERT`, `RNNSERVE_TLS_KEY` and `RNNSERVE_TLS` (1 = TLS with the system roots), so the clients and
the CLI pick them up without code changes.

The key is added by a client interceptor on the channel (the same on plaintext and TLS channels), so every
call of `Client`/`AsyncClient`, streams included, carries it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

AUTH_HEADER = "authorization"


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client authenticates the server and itself (see the module docstring)."""

    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None  # PEM CA to trust; None with tls = the system roots
    certificate_chain: bytes | None = None  # PEM client certificate (mutual TLS)
    private_key: bytes | None = None  # PEM key of certificate_chain
    server_name: str | None = None  # name to check the server certificate against, if not the address host

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key (and the key its certificate)")
        if self.api_key is not None and (
            not self.api_key or not self.api_key.isascii() or "\n" in self.api_key
        ):
            raise ValueError("api_key must be a non-empty ASCII string")

    @property
    def secure(self) -> bool:
        """True if the channel speaks TLS."""
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    @classmethod
    def from_files(
        cls,
        *,
        api_key: str | None = None,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        tls: bool = False,
        server_name: str | None = None,
    ) -> Credentials:
        """Build credentials from PEM file paths (any of them optional)."""

        def read(p: str | Path | None) -> bytes | None:
            return None if p is None or p == "" else Path(p).read_bytes()

        return cls(api_key or None, tls, read(ca), read(cert), read(key), server_name)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Credentials:
        """Credentials from RNNSERVE_API_KEY / RNNSERVE_TLS_CA / _CERT / _KEY / RNNSERVE_TLS."""
        env = os.environ if environ is None else environ
        return cls.from_files(
            api_key=env.get("RNNSERVE_API_KEY") or None,
            ca=env.get("RNNSERVE_TLS_CA") or None,
            cert=env.get("RNNSERVE_TLS_CERT") or None,
            key=env.get("RNNSERVE_TLS_KEY") or None,
            tls=env.get("RNNSERVE_TLS", "") not in ("", "0", "false", "no"),
            server_name=env.get("RNNSERVE_TLS_SERVER_NAME") or None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (only meaningful when `secure`)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> list[tuple[str, Any]]:
        """Extra channel options (the TLS name override)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Return the call metadata that carries the API key (empty without one)."""
        return ((AUTH_HEADER, f"Bearer {self.api_key}"),) if self.api_key else ()


def _with_key(details: Any, pair: tuple[str, str], factory: Any) -> Any:
    metadata = list(details.metadata or ())
    metadata.append(pair)
    return factory(details, metadata)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, d: Any, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _SyncKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    def _d(self, details: Any) -> Any:
        return _with_key(details, self._pair, _SyncDetails)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._d(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._d(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._d(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._d(details), request_iterator)


def _aio_details(d: Any, metadata: list[tuple[str, str]]) -> aio.ClientCallDetails:
    return aio.ClientCallDetails(
        d.method, d.timeout, aio.Metadata(*metadata), d.credentials, d.wait_for_ready
    )


class _AioKeyUU(aio.UnaryUnaryClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self._pair, _aio_details), request)


class _AioKeyUS(aio.UnaryStreamClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self._pair, _aio_details), request)


class _AioKeySU(aio.StreamUnaryClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_key(details, self._pair, _aio_details), request_iterator)


class _AioKeySS(aio.StreamStreamClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_key(details, self._pair, _aio_details), request_iterator)


def open_channel(address: str, options: list[tuple[str, Any]], creds: Credentials) -> grpc.Channel:
    """Open a blocking channel to `address` with TLS and the API key as `creds` say."""
    options = [*options, *creds.options()]
    if creds.secure:
        channel = grpc.secure_channel(address, creds.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    pairs = creds.metadata()
    return grpc.intercept_channel(channel, _SyncKey(pairs[0])) if pairs else channel


def open_aio_channel(address: str, options: list[tuple[str, Any]], creds: Credentials) -> aio.Channel:
    """Open an asyncio channel to `address` with TLS and the API key as `creds` say."""
    options = [*options, *creds.options()]
    pairs = creds.metadata()
    interceptors = (
        [_AioKeyUU(pairs[0]), _AioKeyUS(pairs[0]), _AioKeySU(pairs[0]), _AioKeySS(pairs[0])]
        if pairs
        else None
    )
    if creds.secure:
        return aio.secure_channel(
            address, creds.channel_credentials(), options=options, interceptors=interceptors
        )
    return aio.insecure_channel(address, options=options, interceptors=interceptors)
