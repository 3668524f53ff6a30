"""The client's affinity header on the wire, as the real server receives it.

A front proxy (deploy/components/haproxy, or Envoy's RING_HASH in deploy/components/envoy) keeps a session on
one replica only if every call of that session carries the same key. This starts the real server
(`service.server.start`, in process) with one extra server interceptor that records each call's method and
header, and checks that every per-session RPC of the sync and asyncio clients carries one key per session,
that calls belonging to no session carry none, and that the server's own interceptor serves them normally.
tests/deploy/test_proxy_routing.py then routes sessions by this header through the real HAProxy front proxy.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fixtures
import grpc
import numpy as np
import pytest
from grpc import aio

from service.client import AFFINITY_HEADER, Client, affinity_metadata
from service.client.aio import AsyncClient
from tests.service.server_thread import CuttableProxy, ServerThread, make_settings

VOCAB = len(fixtures.DEFAULT_VOCAB)
NATIVE = "/rnnserve.v1.RecurrentService/"


@dataclass(frozen=True)
class Seen:
    """One call as the server received it."""

    method: str  # short name, e.g. "Step"
    key: str | None  # the affinity header's value, None when absent


class HeaderRecorder(aio.ServerInterceptor):
    """Records (method, affinity header) of every native call, then hands the call on unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(NATIVE):
            values = [v for k, v in (details.invocation_metadata or ()) if k == AFFINITY_HEADER]
            assert len(values) <= 1, f"{details.method}: affinity header sent {len(values)} times"
            with self._lock:
                self._seen.append(Seen(details.method.removeprefix(NATIVE), values[0] if values else None))
        return await continuation(details)

    def take(self) -> list[Seen]:
        """Return the calls recorded since the last take, and forget them."""
        with self._lock:
            seen, self._seen = self._seen, []
        return seen


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("affinity_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    return root


@pytest.fixture(scope="module")
def recorded(repo) -> Iterator[tuple[ServerThread, HeaderRecorder]]:
    """The real server with the recorder in front of its own interceptor (which must not mind the header)."""
    recorder = HeaderRecorder()
    real_server = aio.server

    def server_with_recorder(*args: Any, interceptors: Any = None, **kwargs: Any) -> aio.Server:
        return real_server(*args, interceptors=[recorder, *(interceptors or [])], **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aio, "server", server_with_recorder)
        srv = ServerThread(make_settings(repo))
    yield srv, recorder
    srv.stop()


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


def keys_by_method(seen: list[Seen]) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for s in seen:
        out.setdefault(s.method, set()).add(s.key)
    return out


SESSION_METHODS = {
    "CreateSession",
    "Step",
    "Stream",
    "GetState",
    "SetState",
    "Fork",
    "Reset",
    "Close",
    "DescribeSession",
}


def test_every_call_of_a_session_carries_one_key(recorded):
    srv, recorder = recorded
    with Client(srv.address, timeout=20) as client:
        client.list_models()
        client.get_model("tiny_lstm")
        recorder.take()  # model look-ups belong to no session
        data = tokens(12, seed=1)
        with client.session("tiny_lstm") as s:
            s.step(data[:3])
            list(s.stream([data[3:5], data[5:8]]))
            blob = s.state()
            s.set_state(blob)
            s.describe()
            child = s.fork()
            child.step(data[8:10])
            child.close()
            s.reset()
            s.step(data[10:12])
        other = client.session("tiny_lstm")
        other.step(data[:2])
        other.close()
    seen = recorder.take()
    by_method = keys_by_method(seen)
    assert SESSION_METHODS <= set(by_method), f"not every session RPC was exercised: {sorted(by_method)}"
    first, second = s.affinity_key, other.affinity_key
    assert first != second, "two sessions drew the same random key"
    assert first != s.id, "a created session is keyed by a token drawn before CreateSession, not its id"
    # Calls of `s` (and of its fork, which is created on s's replica and so keeps s's key) carry s's key; then
    # `other`'s three calls carry its own. Nothing goes without a key.
    n_other = 3
    assert [x.key for x in seen[:-n_other]] == [first] * (len(seen) - n_other), seen
    assert [(x.method, x.key) for x in seen[-n_other:]] == [
        ("CreateSession", second),
        ("Step", second),
        ("Close", second),
    ]
    assert child.affinity_key == first


def test_calls_outside_sessions_carry_no_key(recorded):
    srv, recorder = recorded
    recorder.take()
    with Client(srv.address, timeout=20) as client:
        client.list_models()
        client.reload()
    assert {(x.method, x.key) for x in recorder.take()} == {("ListModels", None), ("ReloadRepository", None)}


def test_attach_is_keyed_by_the_session_id(recorded):
    srv, recorder = recorded
    with Client(srv.address, timeout=20) as client:
        created = client.session("tiny_lstm")
        created.step(tokens(3))
        recorder.take()
        with Client(srv.address, timeout=20) as other:
            attached = other.attach(created.id)
            attached.step(tokens(2, seed=2))
            attached.close()
    assert attached.affinity_key == created.id
    assert [(x.method, x.key) for x in recorder.take()] == [
        ("DescribeSession", created.id),
        ("GetModel", None),
        ("Step", created.id),
        ("Close", created.id),
    ]


def test_generate_runs_its_session_under_one_key(recorded):
    srv, recorder = recorded
    with Client(srv.address, timeout=20) as client:
        client.get_model("tiny_lstm")
        recorder.take()
        pieces = list(client.generate("tiny_lstm", prime=[1, 2], n=5, seed=3))
    assert len(pieces) == 5
    seen = recorder.take()
    assert [x.method for x in seen] == ["CreateSession", "Generate", "Close"]
    (key,) = {x.key for x in seen}
    assert key is not None


def test_a_reattached_stream_keeps_the_key(recorded):
    """After a cut connection the stream is re-opened (and the chunk re-sent) under the same key."""
    srv, recorder = recorded
    proxy = CuttableProxy(srv.running.port)
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=20, backoff_s=0.01) as client:
            s = client.session("tiny_lstm")
            data = tokens(9, seed=4)

            def chunks() -> Iterator[np.ndarray]:
                yield data[:3]
                proxy.cut()
                yield data[3:6]
                yield data[6:9]

            recorder.take()
            assert len(list(s.stream(chunks()))) == 3
            s.close()
    finally:
        proxy.close()
    seen = recorder.take()
    assert [x.method for x in seen].count("Stream") >= 2, f"the cut did not force a re-attach: {seen}"
    assert {x.key for x in seen} == {s.affinity_key}


def test_multiplexer_sends_the_key_it_is_given(recorded):
    srv, recorder = recorded
    with Client(srv.address, timeout=20) as client:
        a = client.session("tiny_lstm", affinity_key="gateway-7")
        b = client.session("tiny_lstm", affinity_key="gateway-7")
        with client.multiplexer(affinity_key="gateway-7") as mux:
            results = mux.step([(a, tokens(2)), (b, tokens(2, seed=5))])
        assert all(isinstance(r, dict) for r in results)
        a.close()
        b.close()
    seen = recorder.take()
    assert "StreamMany" in {x.method for x in seen}
    assert {x.key for x in seen if x.method != "GetModel"} == {"gateway-7"}


def test_a_key_that_is_not_a_header_value_is_hashed(recorded):
    """attach() with a malformed id still reaches the server, which answers NOT_FOUND (not a client crash)."""
    srv, recorder = recorded
    bad = "no such\nsession é"
    ((name, value),) = affinity_metadata(bad)
    assert name == AFFINITY_HEADER and value.isascii() and value.isprintable() and len(value) == 64
    recorder.take()
    with Client(srv.address, timeout=5, max_attempts=1) as client, pytest.raises(grpc.RpcError) as err:
        client.attach(bad)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert [(x.method, x.key) for x in recorder.take()] == [("DescribeSession", value)]


def test_async_client_sends_the_same_keys(recorded):
    srv, recorder = recorded

    async def run() -> tuple[str, str, str]:
        async with AsyncClient(srv.address, timeout=20) as client:
            await client.get_model("tiny_lstm")
            recorder.take()
            s = await client.session("tiny_lstm")
            await s.step(tokens(3))
            async for _ in s.stream([tokens(2, seed=6), tokens(2, seed=7)]):
                pass
            await s.set_state(await s.state())
            await s.describe()
            child = await s.fork()
            await child.close()
            await s.reset()
            await s.close()
            attached_id = s.id
            created = await client.session("tiny_lstm")
            await created.step(tokens(2))
            attached = await client.attach(created.id)
            await attached.step(tokens(2, seed=8))
            await attached.close()
            async for _ in client.generate("tiny_lstm", prime=[1], n=3, seed=1):
                pass
            return s.affinity_key, attached_id, created.id

    key, sid, created_id = asyncio.run(run())
    seen = recorder.take()
    methods = [x.method for x in seen]
    assert SESSION_METHODS - {"Fork"} <= set(methods) and "Fork" in methods
    assert key != sid
    n_first = methods.index("CreateSession", 1)  # the calls of the first session end where the second begins
    assert {x.key for x in seen[:n_first]} == {key}
    # The second session: created under a random key, then attached (keyed by its id).
    second = seen[n_first:]
    assert second[0].method == "CreateSession" and second[1].method == "Step"
    assert second[0].key == second[1].key not in (None, created_id)
    assert [(x.method, x.key) for x in second[2:5]] == [
        ("DescribeSession", created_id),
        ("Step", created_id),
        ("Close", created_id),
    ]
    generated = second[5:]
    assert [x.method for x in generated] == ["CreateSession", "Generate", "Close"]
    assert len({x.key for x in generated}) == 1 and generated[0].key is not None
