"""Helpers for engine-level tests: a real Engine (real ONNX Runtime) on a fresh event loop per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.config import Settings
from service.core.engine import Engine
from service.stores.base import SessionStore


def settings(repository: Path, **overrides: Any) -> Settings:
    """Engine settings for tests: fast sweeps, everything else default unless overridden."""
    values: dict[str, Any] = dict(model_repository=repository, sweep_interval_s=0.05)
    values.update(overrides)
    return Settings(**values)


def run_engine(
    repository: Path,
    body: Callable[[Engine], Awaitable[Any]],
    store: SessionStore | None = None,
    **overrides: Any,
) -> Any:
    """Start an engine, run `body(engine)`, always stop the engine; returns body's result."""

    async def main() -> Any:
        engine = Engine(settings(repository, **overrides), registry=CollectorRegistry(), store=store)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `check` until it holds (no timing assertion: the timeout only bounds a broken test)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.02)


def metric(engine: Engine, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from the engine's registry (0 if absent)."""
    value = engine.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
