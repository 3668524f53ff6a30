"""Fixtures for tests/deploy: a real redis-server on a free loopback port (no persistence)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.redis_server import RedisServer, start_redis, stop_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """The module's server, emptied before the test."""
    redis_server.client().flushall()
    return redis_server
