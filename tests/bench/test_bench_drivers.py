"""The load drivers and the KServe echo against real servers: the echo's unary ``Call``, KServe
``ModelStreamInfer``, and the no-op KServe server answering a Triton client.

A few round trips each, on a tiny reference LSTM served by the real ``python -m service.server`` (seconds).
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import psutil
import pytest
import tritonclient.grpc as tc

from tests.bench.drivers import make_driver
from tests.bench.kserve_drivers import KServeStreamDriver, infer_request, kserve_message_sizes
from tests.bench.kserve_echo import capture, served_calls
from tests.bench.loadgen import LoadSpec
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.servers import start_echo, start_kserve_echo, start_service

CFG = RefModelConfig(features=8, hidden=16)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    repo = tmp_path_factory.mktemp("bench_repo")
    write_reference_repository(repo, CFG)
    server = start_service(repo)
    yield server
    server.stop()


def _spec(target: str, address: str, **kw) -> LoadSpec:
    return LoadSpec(target, address, 1, 1, 0.0, 1.0, model="ref_lstm", input_tail=(CFG.features,), **kw)


def _requests_served(address: str) -> int:
    client = tc.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics("ref_lstm")
        return sum(int(s.inference_stats.success.count) for s in stats.model_stats)
    finally:
        client.close()


def test_kserve_stream_driver_steps_one_sequence_and_ends_it(service):
    async def go() -> None:
        async with grpc.aio.insecure_channel(service.address) as channel:
            drivers = [make_driver(_spec("kserve_stream", service.address), channel) for _ in range(2)]
            assert all(isinstance(d, KServeStreamDriver) for d in drivers)
            assert drivers[0].sequence_id != drivers[1].sequence_id
            await asyncio.gather(*(d.open() for d in drivers))
            for _ in range(5):
                await asyncio.gather(*(d.step() for d in drivers))
            for d in drivers:
                await d.close()
            # The end request closed the sequence: stepping it again without a start is refused.
            again = KServeStreamDriver(_spec("kserve_stream", service.address), channel)
            again.sequence_id = drivers[0].sequence_id
            again._req.parameters["sequence_id"].int64_param = again.sequence_id
            again._call = again._stub.ModelStreamInfer()
            with pytest.raises(RuntimeError, match="sequence_start"):
                await again.step()
            again._call.cancel()

    before = _requests_served(service.address)
    asyncio.run(go())
    # open + 5 steps + end, for each of the two sequences
    assert _requests_served(service.address) - before == 2 * 7


def test_kserve_stream_driver_reports_the_servers_error(service):
    async def go() -> None:
        async with grpc.aio.insecure_channel(service.address) as channel:
            driver = make_driver(dataclasses.replace(_spec("kserve_stream", ""), model="nope"), channel)
            with pytest.raises(RuntimeError, match="nope"):
                await driver.open()
            driver._call.cancel()

    asyncio.run(go())


def test_unary_echo_driver_round_trips_kserve_sized_messages():
    spec = _spec("unary_echo", "")
    request_bytes, response_bytes = kserve_message_sizes(spec, ("y", "float32", (CFG.features,)))
    echo = start_echo(64, response_bytes)
    try:

        async def go() -> None:
            async with grpc.aio.insecure_channel(echo.address) as channel:
                driver = make_driver(dataclasses.replace(spec, request_bytes=request_bytes), channel)
                await driver.open()
                for _ in range(3):
                    await driver.step()
                await driver.close()
                answer = await channel.unary_unary("/rnnserve.bench.Echo/Call")(b"x")
                assert len(answer) == response_bytes

        asyncio.run(go())
    finally:
        echo.stop()


def test_echo_as_two_processes_shares_one_port_and_stops_with_its_parent():
    echo = start_echo(16, 8, processes=2)
    try:
        children = psutil.Process(echo.pid).children()
        assert len(children) == 2

        async def go() -> None:
            channels = [grpc.aio.insecure_channel(echo.address) for _ in range(8)]
            try:
                answers = await asyncio.gather(
                    *(ch.unary_unary("/rnnserve.bench.Echo/Call")(b"x") for ch in channels)
                )
            finally:
                for ch in channels:
                    await ch.close()
            assert [len(a) for a in answers] == [8] * 8

        asyncio.run(go())
    finally:
        echo.stop()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_kserve_echo_answers_a_triton_client_as_the_server_did(service, tmp_path):
    import numpy as np

    step = infer_request(_spec("kserve_stream", ""), sequence_id=3)
    step.parameters["sequence_start"].bool_param = True
    step.parameters["sequence_end"].bool_param = True
    answers = capture(service.address, "ref_lstm", step.SerializeToString())
    echo = start_kserve_echo(answers, tmp_path)
    try:
        client = tc.InferenceServerClient(echo.address)
        assert client.get_model_metadata("ref_lstm").inputs[0].name == "x"
        x = tc.InferInput("x", [1, 1, CFG.features], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, CFG.features), np.float32))
        results = [client.infer("ref_lstm", [x], request_id=f"r{i}", sequence_id=9) for i in range(3)]
        assert [r.get_response().id for r in results] == ["r0", "r1", "r2"]
        assert results[0].as_numpy("y").shape == (1, 1, CFG.features)
        assert served_calls(echo.address) == 3
        stats = client.get_inference_statistics("ref_lstm").model_stats[0]
        assert stats.inference_stats.success.count == 3
        client.close()
    finally:
        echo.stop()
