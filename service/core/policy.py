"""How a batcher adapts to its load: when to hold a small batch for more steps, and where to run a batch.

Two decisions, both from measurements the batcher feeds back (pure logic, no I/O, unit-tested alone):

- **Hold.** At partial load batches shrink, and every ONNX Runtime run carries a fixed cost (measured here on
  the reference LSTM: about as much CPU as seven more rows), so CPU per step climbs as load falls. A small
  batch may therefore wait up to `max_delay_s` for more steps. Whether waiting pays is learnt, not assumed:
  the policy keeps a moving average of how many steps a hold gathered. Arrival rate alone cannot tell an open
  stream of steps from closed-loop clients that are all waiting for this very batch; the gain of a hold can.
  While holds gather less than one extra step each, the policy stops holding and re-probes every
  `probe_every` batches, so a change of load is noticed within a fraction of a second.
- **Run inline.** A batch whose ONNX Runtime cost (a moving average per batch-size class) is below
  `inline_max_s` runs on the event loop: for tiny batches the executor hand-off (thread wake-up, GIL hand-off,
  the loop's self-pipe) costs as much CPU as the run itself and adds its latency. When nothing else waits for
  the model (`idle`: the queue is empty once the batch is taken), the bound is `idle_inline_max_s`: there is
  no other step whose batch the run could delay, and the hand-off would only add its CPU and its latency to
  these steps (one sequence at a time, light load). Larger batches run in the executor, so ONNX Runtime
  overlaps the loop's gRPC work. A size class not measured yet runs in the executor.
"""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest measurement in the moving averages


def size_class(work: int) -> int:
    """Bucket of a batch's rows x steps: 1, 2, 3-4, 5-8, ... (a power-of-two class)."""
    return max(1, work - 1).bit_length() if work > 1 else 0


class BatchPolicy:
    """The hold and inline decisions of one batcher (see the module docstring)."""

    __slots__ = (
        "target_rows",
        "max_delay_s",
        "inline_max_s",
        "idle_inline_max_s",
        "probe_every",
        "gain",
        "_since_probe",
        "_cost",
    )

    def __init__(
        self,
        *,
        target_rows: int = 16,
        max_delay_s: float = 0.001,
        inline_max_s: float = 0.0002,
        idle_inline_max_s: float = 0.001,
        probe_every: int = 200,
    ) -> None:
        self.target_rows = target_rows
        self.max_delay_s = max_delay_s
        self.inline_max_s = inline_max_s
        self.idle_inline_max_s = max(inline_max_s, idle_inline_max_s) if inline_max_s > 0 else 0.0
        self.probe_every = probe_every
        self.gain = 0.0  # moving average of steps a hold gathered
        self._since_probe = 0
        self._cost: dict[int, float] = {}  # size class -> moving average of ORT seconds per run

    # -- holding -------------------------------------------------------------------------------------------
    def hold_for(self, queued: int) -> float:
        """Seconds to hold a batch of `queued` steps before taking it (0 = take it now)."""
        if self.max_delay_s <= 0 or queued >= self.target_rows:
            return 0.0
        if self.gain >= 1.0:
            return self.max_delay_s
        self._since_probe += 1
        if self._since_probe >= self.probe_every:  # holds did not pay lately: try one now and then
            self._since_probe = 0
            return self.max_delay_s
        return 0.0

    def held(self, gathered: int) -> None:
        """Record how many steps arrived during a hold."""
        self.gain += ALPHA * (gathered - self.gain)

    # -- where to run ---------------------------------------------------------------------------------------
    def inline(self, work: int, idle: bool = False) -> bool:
        """Run a batch of `work` rows x steps on the event loop (True) or in the executor (False).

        `idle`: no other step waits for the model (the larger bound `idle_inline_max_s` applies).
        """
        if self.inline_max_s <= 0:
            return False
        cost = self._cost.get(size_class(work))
        return cost is not None and cost <= (self.idle_inline_max_s if idle else self.inline_max_s)

    def ran(self, work: int, seconds: float) -> None:
        """Record the ONNX Runtime cost of one batch."""
        c = size_class(work)
        old = self._cost.get(c)
        self._cost[c] = seconds if old is None else old + ALPHA * (seconds - old)
