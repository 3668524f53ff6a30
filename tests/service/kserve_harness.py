"""The real server on its own event loop in a daemon thread, for blocking clients (`tritonclient.grpc`)."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry

from service.config import Settings
from service.server import start


class ServerThread:
    """The real server on its own event loop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(
            start(settings, registry=self.registry), self.loop
        ).result(timeout=60)
        self.url = f"127.0.0.1:{self.running.port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self) -> None:
        try:
            self.call(self.running.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
