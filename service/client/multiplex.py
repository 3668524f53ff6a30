"""`Multiplexer`: many sessions stepped with one `StreamMany` message per call (the blocking client)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from service import wire
from service.client.common import Inputs, LockStepCall, affinity_metadata, encode_inputs
from service.proto import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from service.client.sync import Client, Session


@dataclass(frozen=True, slots=True)
class RowError:
    """A session's chunk that a multiplexed step refused (the other sessions of the message went on)."""

    session_id: str
    code: grpc.StatusCode
    message: str
    # Why the row's session is gone (idle, lifetime, capacity, closed, moved, ...), "" if it is not.
    reason: str = ""


class Multiplexer(LockStepCall):
    """Step many sessions (of one model version) with one `StreamMany` message per call, in lock-step.

    For a gateway forwarding many devices: one message carries every session's chunk and one answer carries
    every session's outputs, which is far cheaper per step than one message per session. After a transport
    error the same message (same seqs) is re-sent on the next address; rows that were applied are answered
    from the cache, so every chunk applies exactly once.
    """

    _CODES = {c.value[0]: c for c in grpc.StatusCode}

    def __init__(self, client: Client, *, affinity_key: str | None = None) -> None:
        super().__init__()
        self._client = client
        self._metadata = affinity_metadata(affinity_key) if affinity_key is not None else None
        self._tag = 0

    def _open(self) -> None:
        self._start(self._client.stub.StreamMany, self._metadata)

    def step(
        self, chunks: Sequence[tuple[Session, Inputs]], *, last_only: bool = False
    ) -> list[dict[str, np.ndarray] | RowError]:
        """Apply one chunk per session (equal shapes); returns each session's outputs or its `RowError`."""
        if not chunks:
            return []
        sessions = [s for s, _ in chunks]
        encoded = [encode_inputs(s.model, x) for s, x in chunks]
        names = [t.name for t in encoded[0]]
        stacked = {
            name: np.stack([wire.tensor_to_array(row[j]) for row in encoded]) for j, name in enumerate(names)
        }
        self._tag += 1
        request = pb.StepManyRequest(
            tag=self._tag,
            session_ids=[s.id for s in sessions],
            seqs=[s.seq + 1 for s in sessions],
            inputs=wire.arrays_to_tensors(stacked),
            last_only=last_only,
            lifecycle_events=True,  # read from the stream's first message: a drain is told, then resumed
        )
        response = self._send(request)
        outputs = {t.name: wire.tensor_to_array(t, "output") for t in response.outputs}
        results: list[dict[str, np.ndarray] | RowError] = []
        for i, s in enumerate(sessions):
            if response.codes[i]:
                code = self._CODES.get(response.codes[i], grpc.StatusCode.UNKNOWN)
                reason = _reason_name(response.reasons[i]) if response.reasons else ""
                results.append(RowError(s.id, code, response.messages[i], reason))
            else:
                s.seq = request.seqs[i]
                results.append({name: arr[i] for name, arr in outputs.items()})
        return results

    def _send(self, request: pb.StepManyRequest) -> pb.StepManyResponse:
        return self._exchange(self._client, request, session_bound=False)  # type: ignore[no-any-return]

    def close(self) -> None:
        """End the stream (the sessions stay open)."""
        self._end()

    def __enter__(self) -> Multiplexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason_name(value: int) -> str:
    return "" if not value else pb.EndReason.Name(value)[len("END_REASON_") :].lower()  # type: ignore[arg-type]
