"""A KServe streaming driver: one Triton sequence per ``ModelStreamInfer`` stream, one step per message.

This is what a Triton user's streaming client sends (``sequence_id`` with ``sequence_start`` on the first
request and ``sequence_end`` on the last), written on raw grpc.aio with tritonclient's generated stubs so that
the load generator can pace it like the native ``Stream`` (perf_analyzer cannot pace a streaming sequence
model). The request is built once per stream; only the flags change. Answers are checked: no
``error_message``, one output tensor of the expected size.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype

from tests.bench.drivers import Driver

if TYPE_CHECKING:
    import grpc

    from tests.bench.loadgen import LoadSpec


def infer_request(spec: LoadSpec, sequence_id: int, seed: int = 0) -> service_pb2.ModelInferRequest:
    """One step of one sequence: the model's data input of shape ``(1, T, *tail)``, binary (raw) contents."""
    dtype = np.dtype(spec.input_dtype).newbyteorder("<")
    shape = (1, spec.steps_per_message, *spec.input_tail)
    if dtype.kind == "f":
        data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    else:
        data = np.zeros(shape, dtype)
    req = service_pb2.ModelInferRequest(model_name=spec.model)
    tensor = req.inputs.add()
    tensor.name = spec.input_name
    tensor.datatype = np_to_triton_dtype(dtype.newbyteorder("="))
    tensor.shape.extend(shape)
    req.raw_input_contents.append(data.tobytes())
    req.parameters["sequence_id"].int64_param = sequence_id
    return req


def kserve_message_sizes(spec: LoadSpec, output: tuple[str, str, tuple[int, ...]]) -> tuple[int, int]:
    """Serialized sizes of one sequence step's ``ModelInferRequest`` and of its ``ModelInferResponse``.

    ``output`` is the model's data output ``(name, dtype, dims after (batch, time))``; the response carries it
    as raw contents, as the server answers a request that asks for no particular outputs.
    """
    req = infer_request(spec, sequence_id=2**55)  # a typical random id's varint length
    name, dtype, tail = output
    shape = (1, spec.steps_per_message, *tail)
    dt = np.dtype(dtype)
    resp = service_pb2.ModelInferResponse(model_name=spec.model, model_version="1")
    out = resp.outputs.add()
    out.name = name
    out.datatype = np_to_triton_dtype(dt)
    out.shape.extend(shape)
    resp.raw_output_contents.append(bytes(int(np.prod(shape)) * dt.itemsize))
    return req.ByteSize(), resp.ByteSize()


class KServeStreamDriver(Driver):
    """One sequence on one ``ModelStreamInfer`` stream: start on ``open``, a step per round trip, end on
    ``close``."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # Random, non-zero, below 2**63 (an int64 parameter): unique across client processes in practice.
        self.sequence_id = int.from_bytes(os.urandom(7), "little") | 1
        self._req = infer_request(spec, self.sequence_id)
        self._call: Any = None

    async def _round_trip(self, req: service_pb2.ModelInferRequest) -> None:
        await self._call.write(req)
        resp = await self._call.read()
        if not isinstance(resp, service_pb2.ModelStreamInferResponse):
            raise RuntimeError(f"ModelStreamInfer ended early: {resp!r}")
        if resp.error_message:
            raise RuntimeError(f"sequence {self.sequence_id}: {resp.error_message}"[:300])
        if len(resp.infer_response.raw_output_contents) < 1 and not resp.infer_response.outputs:
            raise RuntimeError(f"sequence {self.sequence_id}: answer without outputs: {resp!r}"[:300])

    async def open(self) -> None:
        self._call = self._stub.ModelStreamInfer()
        first = service_pb2.ModelInferRequest()
        first.CopyFrom(self._req)
        first.parameters["sequence_start"].bool_param = True
        await self._round_trip(first)

    async def step(self) -> None:
        await self._round_trip(self._req)

    async def close(self) -> None:
        if self._call is None:
            return
        last = service_pb2.ModelInferRequest()
        last.CopyFrom(self._req)
        last.parameters["sequence_end"].bool_param = True
        try:
            await self._round_trip(last)  # the server closes the sequence's session
            await self._call.done_writing()
        finally:
            self._call.cancel()
