"""The protocol-agnostic serving core that both APIs (native gRPC and KServe v2) call.

SKELETON: signatures are final (docs/DESIGN.md section 3); bodies land next.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.repository import ModelConfig, ModelSpec, StateSpec, TensorSpec
from service.store import SessionStore

__all__ = ["Engine", "GeneratedToken", "ModelConfig", "ModelSpec", "SessionInfo", "StateSpec", "StepResult",
           "TensorSpec"]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as clients see it (times are time.monotonic() seconds; expires_at = idle expiry)."""

    session_id: str
    model: str
    version: int
    last_seq: int
    created_at: float
    last_used: float
    idle_ttl_s: float
    expires_at: float
    steps: int


@dataclass(frozen=True, slots=True)
class StepResult:
    """Outputs of one applied chunk, per session: arrays `(T, ...)` without the batch axis."""

    seq: int
    outputs: dict[str, np.ndarray]
    cached: bool


class GeneratedToken(NamedTuple):
    """One sampled token of `Engine.generate`."""

    token_id: int
    text: str


class Engine:
    """See docs/DESIGN.md section 3."""

    def __init__(
        self, settings: Settings, *, registry: CollectorRegistry | None = None, store: SessionStore | None = None
    ) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Load the repository, start batchers, the sweeper and the repository watcher."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop everything (idempotent)."""
        raise NotImplementedError

    def reload(self) -> None:
        """Rescan the repository now."""
        raise NotImplementedError

    def list_models(self) -> list[ModelSpec]:
        """Newest version of each model (`ModelSpec.versions` lists the versions on disk)."""
        raise NotImplementedError

    def get_model(self, name: str, version: int | None = None) -> ModelSpec:
        """One model version's spec."""
        raise NotImplementedError

    async def create_session(
        self,
        model: str,
        version: int | None = None,
        *,
        idle_ttl_s: float | None = None,
        initial_state: dict[str, np.ndarray] | None = None,
        protocol: str = "native",
    ) -> SessionInfo:
        """Open a session."""
        raise NotImplementedError

    async def step(
        self, session_id: str, seq: int, inputs: dict[str, np.ndarray], *, last_only: bool = False
    ) -> StepResult:
        """Apply one chunk."""
        raise NotImplementedError

    async def infer_stateless(
        self, model: str, version: int | None, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run once from the initial state; inputs and outputs WITH the batch axis."""
        raise NotImplementedError

    async def get_state(self, session_id: str) -> bytes:
        """Snapshot blob."""
        raise NotImplementedError

    async def set_state(self, session_id: str, blob: bytes) -> SessionInfo:
        """Replace state from a blob."""
        raise NotImplementedError

    async def fork(self, session_id: str, *, idle_ttl_s: float | None = None) -> SessionInfo:
        """New session from a copy of another's state."""
        raise NotImplementedError

    async def reset(self, session_id: str) -> SessionInfo:
        """State back to initial, seq back to 0."""
        raise NotImplementedError

    async def close(self, session_id: str) -> None:
        """End a session."""
        raise NotImplementedError

    def describe(self, session_id: str) -> SessionInfo:
        """A session's info."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Refuse new sessions, finish in-flight steps, flush the store."""
        raise NotImplementedError

    async def generate(
        self,
        *,
        model: str | None = None,
        version: int | None = None,
        session_id: str | None = None,
        seq: int = 0,
        prime_ids: Sequence[int] | None = None,
        prime_text: str | None = None,
        n: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample tokens (token models)."""
        raise NotImplementedError
        yield GeneratedToken(0, "")
