"""A no-op KServe server: the Python gRPC floor for a KServe client such as ``perf_analyzer``.

perf_analyzer speaks only the KServe API, so to hold the server's KServe paths against the floor *with the
same client*, this server answers every KServe method perf_analyzer calls with bytes captured from the real
server once (``capture``): ModelMetadata, ModelConfig, ModelStatistics, ... and, for ``ModelInfer`` and each
message of ``ModelStreamInfer``, the real answer to one sequence step. The one thing it does per call is what
any KServe server must: copy the request's ``id`` into the answer (perf_analyzer matches answers to requests
by it). It reads only the first fields of the request to find the id, parses nothing else and computes
nothing.

Run as ``python -m tests.bench.kserve_echo ANSWERS_JSON``; it prints ``{"port": P, "pid": PID}`` on stdout and
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

SERVICE = "inference.GRPCInferenceService"
COUNT_METHOD = "/rnnserve.bench.KServeEcho/Count"


def capture(address: str, model: str, step: bytes) -> dict[str, bytes]:
    """The real server's serialized answers to the KServe calls perf_analyzer makes, for ``model``.

    ``step`` is a serialized ``ModelInferRequest`` (one sequence step, with ``sequence_start``); its answer is
    what the echo gives every ``ModelInfer``.
    """
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    requests = {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ModelReady": pb.ModelReadyRequest(name=model),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelMetadata": pb.ModelMetadataRequest(name=model),
        "ModelConfig": pb.ModelConfigRequest(name=model),
        "ModelStatistics": pb.ModelStatisticsRequest(name=model),
        "ModelInfer": pb.ModelInferRequest.FromString(step),
    }
    requests["ModelInfer"].id = ""  # the echo writes each request's own id in
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return {
            name: getattr(stub, name)(req, timeout=30).SerializeToString() for name, req in requests.items()
        }


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def request_id(buf: bytes) -> bytes:
    """The ``id`` (field 3) of a serialized ``ModelInferRequest``; ``b""`` when it has none.

    Serializers write fields in number order, so the scan stops at the first field past 3 (after at most
    ``model_name`` and ``model_version``).
    """
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire_type = key >> 3, key & 7
        if field > 3:
            return b""
        if wire_type == 2:
            size, i = _varint(buf, i)
            if field == 3:
                return buf[i : i + size]
            i += size
        elif wire_type == 0:
            _, i = _varint(buf, i)
        else:  # fields 1-3 are strings; anything else is not a ModelInferRequest
            return b""
    return b""


def split_response(response: bytes) -> tuple[bytes, bytes]:
    """Split a serialized ``ModelInferResponse`` without an id into (fields 1-2, fields 4 and up).

    The id field (3) goes between the two parts: ``head + field_3 + tail`` is the answer with that id.
    """
    i = 0
    while i < len(response):
        key, j = _varint(response, i)
        if key >> 3 > 2:
            return response[:i], response[i:]
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type in field {key >> 3} of a ModelInferResponse")
        size, j = _varint(response, j)
        i = j + size
    return response, b""


def answer(head: bytes, tail: bytes, request: bytes) -> bytes:
    """The captured ``ModelInferResponse`` (split by ``split_response``) with ``request``'s id."""
    rid = request_id(request)
    return head + b"\x1a" + _encode_varint(len(rid)) + rid + tail if rid else head + tail


def _statistics(captured: bytes, served: int) -> bytes:
    """The captured ModelStatistics answer with every count set to ``served`` (called a few times per run)."""
    from tritonclient.grpc import service_pb2 as pb

    stats = pb.ModelStatisticsResponse.FromString(captured)
    for model in stats.model_stats:
        model.inference_count = model.execution_count = served
        model.inference_stats.success.count = served
        for part in ("queue", "compute_input", "compute_infer", "compute_output"):
            getattr(model.inference_stats, part).count = served
    return stats.SerializeToString()


def make_handlers(answers: dict[str, bytes]) -> tuple[grpc.GenericRpcHandler, grpc.GenericRpcHandler]:
    """Generic handlers: each captured KServe method answered with its captured bytes (``ModelInfer`` and
    ``ModelStreamInfer`` with the request's id copied in), and ``COUNT_METHOD`` (the steps answered so far,
    as decimal text: the benchmark's CPU-per-step denominator)."""
    served = [0]
    head, tail = split_response(answers["ModelInfer"])

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        served[0] += 1
        return answer(head, tail, request)

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            served[0] += 1
            inner = answer(head, tail, request)
            yield b"\x12" + _encode_varint(len(inner)) + inner  # ModelStreamInferResponse.infer_response

    def fixed(response: bytes) -> grpc.RpcMethodHandler:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return response

        return grpc.unary_unary_rpc_method_handler(call)

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(served[0]).encode()

    async def statistics(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # perf_analyzer reads which version served its requests from the counts: they must move.
        return _statistics(answers["ModelStatistics"], served[0])

    methods = {name: fixed(r) for name, r in answers.items() if name not in ("ModelInfer", "ModelStatistics")}
    methods["ModelStatistics"] = grpc.unary_unary_rpc_method_handler(statistics)
    methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(infer)
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(stream)
    kserve = grpc.method_handlers_generic_handler(SERVICE, methods)
    counter = grpc.method_handlers_generic_handler(
        COUNT_METHOD.split("/")[1], {"Count": grpc.unary_unary_rpc_method_handler(count)}
    )
    return kserve, counter


def served_calls(address: str, model: str = "") -> int:
    """``ModelInfer`` calls the echo at ``address`` has answered (``model`` is ignored: one model)."""
    with grpc.insecure_channel(address) as channel:
        return int(channel.unary_unary(COUNT_METHOD)(b"", timeout=30))


async def serve(answers: dict[str, bytes], host: str = "127.0.0.1") -> None:
    """Serve until a signal arrives; report the bound port on stdout."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(make_handlers(answers))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def write_answers(answers: dict[str, bytes], path: Path) -> None:
    """Store captured answers for the echo process (base64 in JSON)."""
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in answers.items()}))


def read_answers(path: Path) -> dict[str, bytes]:
    """Read answers written by ``write_answers``."""
    return {k: base64.b64decode(v) for k, v in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("answers", type=Path, help="JSON written by write_answers")
    args = parser.parse_args(argv)
    asyncio.run(serve(read_answers(args.answers)))
    sys.exit(0)


if __name__ == "__main__":
    main()
