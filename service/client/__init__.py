"""Python clients of the native API: `Client` (blocking), `AsyncClient` (asyncio) and the `rnnserve` CLI.

This package needs only grpcio, protobuf and numpy (the `client` install): it never imports the server's
core, ONNX Runtime or the stores.
"""

from service.client.aio import AsyncClient, AsyncSession
from service.client.security import Credentials
from service.client.sync import (
    AFFINITY_HEADER,
    Client,
    ModelInfo,
    Multiplexer,
    RowError,
    Session,
    SessionEnded,
    SessionInfo,
    TensorInfo,
    affinity_metadata,
    default_address,
    new_affinity_key,
    parse_addresses,
)

__all__ = [
    "AFFINITY_HEADER",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Credentials",
    "ModelInfo",
    "Multiplexer",
    "RowError",
    "Session",
    "SessionEnded",
    "SessionInfo",
    "TensorInfo",
    "affinity_metadata",
    "default_address",
    "new_affinity_key",
    "parse_addresses",
]
