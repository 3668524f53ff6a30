"""`service.client.aio.AsyncClient` against the real server (its own event loop in this test's thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from server_thread import CuttableProxy, ServerThread, make_settings

from service.client.aio import AsyncClient

ATOL = 1e-5
VOCAB = len(fixtures.DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aio_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(make_settings(repo))
    yield srv
    srv.stop()


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


def whole(repo: Path, data: np.ndarray) -> np.ndarray:
    return fixtures.run_whole(repo / "tiny_lstm" / "1" / "model.onnx", {"tokens": data[None]})["logits"][0]


def test_async_sessions_step_stream_state(server, repo):
    data = tokens(30, seed=1)
    want = whole(repo, data)

    async def run() -> None:
        async with AsyncClient(server.address) as client:
            assert [m.name for m in await client.list_models()] == ["tiny_lstm"]
            async with await client.session("tiny_lstm") as s:
                got = [(await s.step(data[:4]))["logits"]]
                blob = await s.state()
                got += [out["logits"] async for out in s.stream([data[4:9], data[9:30]])]
                np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
                assert s.seq == 3 and (await s.describe()).steps == 30
                await s.set_state(blob)
                assert s.seq == 1
                async with await s.fork() as f:
                    np.testing.assert_allclose((await f.step(data[4:]))["logits"], want[4:], atol=ATOL)
                await s.reset()
                np.testing.assert_allclose((await s.step(data))["logits"], want, atol=ATOL)
            pieces = [p async for p in client.generate("tiny_lstm", prime="AB", n=12, seed=2)]
            assert len(pieces) == 12
            with pytest.raises(grpc.RpcError) as err:
                await client.session("nope")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(run())


def test_async_many_concurrent_sessions_equal_each_alone(server, repo):
    datas = [tokens(24, seed=10 + i) for i in range(12)]

    async def one(client: AsyncClient, data: np.ndarray) -> np.ndarray:
        async with await client.session("tiny_lstm") as s:
            return np.concatenate([out["logits"] async for out in s.stream([data[:5], data[5:6], data[6:]])])

    async def run() -> list[np.ndarray]:
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(*(one(client, d) for d in datas))

    for got, data in zip(asyncio.run(run()), datas, strict=True):
        np.testing.assert_allclose(got, whole(repo, data), atol=ATOL)


def test_async_stream_survives_connection_reset(server, repo):
    data = tokens(20, seed=3)
    want = whole(repo, data)
    proxy = CuttableProxy(server.running.port)

    async def chunks():
        yield data[:6]
        proxy.cut()
        yield data[6:13]
        yield data[13:]

    async def run() -> None:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10, backoff_s=0.01) as client:
            s = await client.session("tiny_lstm")
            got = [out["logits"] async for out in s.stream(chunks())]
            np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
            info = await s.describe()
            assert info.last_seq == 3 and info.steps == 20
            assert client.failovers >= 1
            await s.close()

    try:
        asyncio.run(run())
    finally:
        proxy.close()
