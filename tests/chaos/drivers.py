"""Chaos clients: sessions driven through raw gRPC stubs (native `Step`, KServe sequences), logged.

Each driver owns one session (or one KServe sequence) and, before every request, picks the replica it sends
to: usually the one it used last, sometimes another at random (a balancer that loses affinity). No client
library retry logic is involved: what the log records is exactly what the server answered.

Native: a chunk carries its seq and is re-sent with the same seq (to any replica) until it is acknowledged, so
every chunk in the log is acknowledged. KServe: a request has no seq, so a failed one is logged as unknown and
the next request carries new tokens; the checker works out whether the failed one was applied.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from tests.chaos.checker import Event, Note, SessionLog

MODEL = "tiny_lstm"
REPLICA_HEADER = "x-rnnserve-replica"
_EXPECTED = re.compile(r"expected seq (\d+)")
# Answers after which the same request may be sent again (to the same or another replica).
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
}


def _replica(call_or_err: object) -> str:
    """The replica named by a reply's trailing metadata (`x-rnnserve-replica`), or "?" when absent."""
    try:
        meta = call_or_err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a call that never reached a server has no metadata
        return "?"
    return next((v for k, v in meta if k == REPLICA_HEADER), "?")


def backoff(failures: int) -> float:
    """Seconds to wait before the next retry: jittered, doubling from 20 ms up to 0.5 s."""
    return min(0.5, 0.02 * 2 ** min(failures, 5)) * (0.5 + random.random())


@dataclass
class Stats:
    """What the drivers saw, beyond the logs."""

    requests: int = 0
    errors: int = 0
    acks: int = 0  # acknowledged steps (the short run goes on until it has enough of them)
    abandoned: int = 0  # sessions given up (no answer for `give_up_s`), not a correctness failure


class Router:
    """Picks a replica channel per request: sticky, moving at random with probability `p_move`."""

    def __init__(self, channels: Callable[[], list[grpc.Channel]], rng: random.Random, p_move: float) -> None:
        self._channels = channels
        self._rng = rng
        self._p_move = p_move
        self._current: int | None = None

    def pick(self, *, move: bool = False) -> grpc.Channel:
        chans = self._channels()
        if self._current is None or move or self._rng.random() < self._p_move:
            self._current = self._rng.randrange(len(chans))
        return chans[self._current % len(chans)]


class NativeDriver:
    """One native session: CreateSession, then Step seq 1, 2, ... each until acknowledged."""

    kind = "native"

    def __init__(
        self,
        name: str,
        router: Router,
        rng: np.random.Generator,
        vocab: int,
        *,
        chunk_t: int,
        call_timeout_s: float,
        give_up_s: float,
        stats: Stats,
    ) -> None:
        self.log = SessionLog(name, self.kind)
        self.router, self.rng, self.vocab, self.chunk_t = router, rng, vocab, chunk_t
        self.call_timeout_s, self.give_up_s, self.stats = call_timeout_s, give_up_s, stats
        self.session_id: str | None = None
        self.seq = 0  # last acknowledged seq
        self.done = False
        self.replica = ""  # the replica that gave the last answer (trailing metadata)

    def _call(self, fn: Callable[[pb_grpc.RecurrentServiceStub], tuple[object, object]]) -> object:
        """Send until answered or a non-retryable status; moves to another replica after a failure.

        `fn` makes the call `with_call`; the replica that answered (or refused) is kept in `self.replica`.
        """
        deadline = time.monotonic() + self.give_up_s
        move = False
        failures = 0
        while True:
            self.stats.requests += 1
            try:
                resp, call = fn(pb_grpc.RecurrentServiceStub(self.router.pick(move=move)))
                self.replica = _replica(call)
                return resp
            except grpc.RpcError as err:
                self.replica = _replica(err)
                self.stats.errors += 1
                code = err.code()
                moved = code == grpc.StatusCode.NOT_FOUND and "reason: moved" in (err.details() or "")
                if (code not in RETRYABLE and not moved) or time.monotonic() > deadline:
                    raise
                move = True
                failures += 1
                time.sleep(backoff(failures))

    def step(self) -> None:
        if self.done:
            return
        try:
            if self.session_id is None:
                info = self._call(
                    lambda s: s.CreateSession.with_call(
                        pb.CreateSessionRequest(model=MODEL, idle_ttl_s=3600), timeout=self.call_timeout_s
                    )
                )
                self.session_id = info.session_id  # type: ignore[attr-defined]
                self.log.notes.append(
                    Note(time.monotonic(), self.replica, f"created session={self.session_id}")
                )
                return
            tokens = self.rng.integers(0, self.vocab, self.chunk_t, dtype=np.int64)
            req = pb.StepRequest(
                session_id=self.session_id, seq=self.seq + 1, inputs=[wire.array_to_tensor("tokens", tokens)]
            )
            resp = self._call(lambda s: s.Step.with_call(req, timeout=self.call_timeout_s))
        except grpc.RpcError as err:
            self._refused(err, "Step")
            return
        outs = wire.tensors_to_arrays(resp.outputs)  # type: ignore[attr-defined]
        self.seq += 1
        self.stats.acks += 1
        self.log.events.append(Event(tokens, outs["logits"], self.replica, time.monotonic()))

    def _refused(self, err: grpc.RpcError, rpc: str) -> None:
        """A final answer that is not an acknowledgement: record what it says about acknowledged steps."""
        self.done = True
        details = err.details() or ""
        self.log.notes.append(
            Note(
                time.monotonic(),
                self.replica,
                f"{rpc} seq {self.seq + 1}: {err.code().name}: {details[:200]}",
            )
        )
        m = _EXPECTED.search(details)
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION and m and int(m.group(1)) <= self.seq:
            self.log.missing += self.seq - int(m.group(1)) + 1
        elif err.code() == grpc.StatusCode.NOT_FOUND and self.seq > 0:
            self.log.missing += self.seq
        elif err.code() in RETRYABLE:
            self.stats.abandoned += 1
        else:
            self.log.missing += 0
            self.stats.abandoned += 1
        self.log.name += f" [{err.code().name}: {details[:120]}]"

    def finish(self) -> None:
        """Compare the server's last_seq with what was acknowledged."""
        if self.done or self.session_id is None:
            return
        try:
            info = self._call(
                lambda s: s.DescribeSession.with_call(
                    pb.SessionRequest(session_id=self.session_id), timeout=self.call_timeout_s
                )
            )
        except grpc.RpcError as err:
            self._refused(err, "DescribeSession")
            return
        if info.last_seq < self.seq:  # type: ignore[attr-defined]
            self.log.missing += self.seq - info.last_seq  # type: ignore[attr-defined]
            self.log.notes.append(
                Note(
                    time.monotonic(),
                    self.replica,
                    f"DescribeSession: last_seq {info.last_seq}, acknowledged {self.seq}",  # type: ignore[attr-defined]
                )
            )


def _kserve_request(sequence_id: int, tokens: np.ndarray, start: bool) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name=MODEL)
    req.parameters["sequence_id"].int64_param = sequence_id
    if start:
        req.parameters["sequence_start"].bool_param = True
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend([1, len(tokens)])
    req.raw_input_contents.append(tokens.astype("<i8").tobytes())
    return req


class KServeDriver:
    """One Triton sequence: a start request, then requests without seq; failures are logged as unknown."""

    kind = "kserve"
    MAX_UNKNOWN = (
        5  # consecutive unknown outcomes after which the sequence is restarted (checker branch limit)
    )

    def __init__(
        self,
        name: str,
        router: Router,
        rng: np.random.Generator,
        vocab: int,
        *,
        chunk_t: int,
        call_timeout_s: float,
        give_up_s: float,
        stats: Stats,
        sequence_ids: Callable[[], int],
    ) -> None:
        self.name = name
        self.logs: list[SessionLog] = []
        self.router, self.rng, self.vocab, self.chunk_t = router, rng, vocab, chunk_t
        self.call_timeout_s, self.give_up_s, self.stats = call_timeout_s, give_up_s, stats
        self._ids = sequence_ids
        self.sequence_id = 0
        self.log: SessionLog | None = None
        self.unknown = 0
        self.done = False
        self.replica = ""

    def _infer(self, req: kpb.ModelInferRequest, move: bool) -> np.ndarray:
        self.stats.requests += 1
        stub = kpb_grpc.GRPCInferenceServiceStub(self.router.pick(move=move))
        try:
            resp, call = stub.ModelInfer.with_call(req, timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            self.replica = _replica(err)
            raise
        self.replica = _replica(call)
        shape = list(resp.outputs[0].shape)
        return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(shape)[0]

    def step(self) -> None:
        tokens = self.rng.integers(0, self.vocab, self.chunk_t, dtype=np.int64)
        if self.log is None:
            self._start(tokens)
            return
        try:
            out = self._infer(_kserve_request(self.sequence_id, tokens, False), move=self.unknown > 0)
        except grpc.RpcError as err:
            self.stats.errors += 1
            if err.code() in RETRYABLE:
                self.log.events.append(Event(tokens, None, self.replica, time.monotonic()))
                self.unknown += 1
                time.sleep(backoff(self.unknown))
                if self.unknown >= self.MAX_UNKNOWN:
                    self.log.name += " [restarted after unknown outcomes]"
                    self.log = None
                return
            # The sequence is gone although it was never ended: every acknowledged step is missing.
            self.log.missing += sum(e.output is not None for e in self.log.events)
            self.log.notes.append(
                Note(
                    time.monotonic(),
                    self.replica,
                    f"ModelInfer: {err.code().name}: {(err.details() or '')[:200]}",
                )
            )
            self.log.name += f" [{err.code().name}: {(err.details() or '')[:120]}]"
            self.log = None
            return
        self.unknown = 0
        self.stats.acks += 1
        self.log.events.append(Event(tokens, out, self.replica, time.monotonic()))

    def _start(self, tokens: np.ndarray) -> None:
        """Start a new sequence; a start is re-sent until acknowledged (a start restarts from zero anyway)."""
        self.sequence_id = self._ids()
        deadline = time.monotonic() + self.give_up_s
        move = False
        failures = 0
        while True:
            try:
                out = self._infer(_kserve_request(self.sequence_id, tokens, True), move=move)
                break
            except grpc.RpcError as err:
                self.stats.errors += 1
                if err.code() not in RETRYABLE or time.monotonic() > deadline:
                    self.stats.abandoned += 1
                    return
                move = True
                failures += 1
                time.sleep(backoff(failures))
        self.log = SessionLog(
            f"{self.name} seq-id {self.sequence_id}",
            self.kind,
            [Event(tokens, out, self.replica, time.monotonic())],
        )
        self.logs.append(self.log)
        self.unknown = 0

    def finish(self) -> None:
        """Nothing to ask: a KServe sequence's state is only visible through its outputs."""
