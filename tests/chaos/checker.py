"""The chaos checker: replay every session's history in ONNX Runtime and count what the server got wrong.

A client log holds, per session, the chunks it sent in order, each with the output the server acknowledged, or
`None` when the call failed and the client cannot know whether it was applied (a KServe request has no seq, so
a failed one may or may not have been applied; a native chunk is retried with its seq until acknowledged, so
it only ever appears acknowledged). The checker walks the log keeping the set of states the server may hold:

- an acknowledged chunk must produce exactly the acknowledged output from one of those states, applied once;
- an unacknowledged chunk forks the set: applied zero times, once, or twice (twice is a bug: `doubled`);
- when no state explains an acknowledged output, the checker looks for the fault that does: the server
  reverted to an earlier acknowledged state (`lost`, counted in steps), or applied a chunk twice (`doubled`);
  when nothing explains it, the output is `diverged` and the rest of that session is not checked.

`missing` counts acknowledged steps a server later denied having (native: it asked for a seq at or below one
it had acknowledged, or described a session with a lower last_seq). All four counts must be zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

MAX_BRANCHES = 729  # 3 ** 6: six unresolved requests in a row; a driver restarts its sequence before that
ATOL = 1e-4


@dataclass(slots=True)
class Event:
    """One chunk sent: its tokens `(T,)` and the acknowledged logits `(T, V)`, or None (outcome unknown).

    `replica` and `t` (monotonic seconds) say who answered and when: evidence for a fault's report.
    """

    tokens: np.ndarray
    output: np.ndarray | None
    replica: str = ""
    t: float = 0.0


@dataclass(slots=True)
class Note:
    """A final answer worth reporting (a refusal, a describe that denies acknowledged steps)."""

    t: float
    replica: str
    text: str


@dataclass
class SessionLog:
    """Everything one client did with one session (or one KServe sequence), in order."""

    name: str
    kind: str  # "native" or "kserve"
    events: list[Event] = field(default_factory=list)
    missing: int = 0  # acknowledged steps the server later denied (set by the driver)
    notes: list[Note] = field(default_factory=list)


@dataclass
class Counts:
    """What the checker found; `lost`, `doubled`, `diverged` and `missing` must all be zero."""

    sessions: int = 0
    steps_checked: int = 0
    unknown_outcomes: int = 0
    lost: int = 0
    doubled: int = 0
    diverged: int = 0
    missing: int = 0
    unchecked: int = 0  # acknowledged steps after a divergence (or past the branch limit): not judged
    faults: list[str] = field(default_factory=list)  # one line per fault found, for the report

    def add(self, other: Counts) -> None:
        for name in (
            "sessions",
            "steps_checked",
            "unknown_outcomes",
            "lost",
            "doubled",
            "diverged",
            "missing",
            "unchecked",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.faults.extend(other.faults)

    @property
    def clean(self) -> bool:
        return self.lost == self.doubled == self.diverged == self.missing == 0

    def summary(self) -> dict[str, int]:
        return {
            "sessions": self.sessions,
            "steps_checked": self.steps_checked,
            "unknown_outcomes": self.unknown_outcomes,
            "lost": self.lost,
            "doubled": self.doubled,
            "diverged": self.diverged,
            "acknowledged_but_missing": self.missing,
            "unchecked": self.unchecked,
        }


class Reference:
    """The model run directly in ONNX Runtime, one chunk at a time on a batch of candidate states."""

    def __init__(self, model_path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.state_names = [
            i.name[len("state_in_") :] for i in self.sess.get_inputs() if i.name.startswith("state_in_")
        ]
        self.shapes = {
            i.name[len("state_in_") :]: i.shape[1:]
            for i in self.sess.get_inputs()
            if i.name.startswith("state_in_")
        }
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def zero(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, *self.shapes[n]), np.float32) for n in self.state_names}

    def apply(self, states: list[dict[str, np.ndarray]], tokens: np.ndarray):
        """Apply one chunk to each state; returns (logits per state, new states)."""
        if not states:
            return [], []
        feeds = {"tokens": np.repeat(tokens[None, :].astype(np.int64), len(states), axis=0)}
        for n in self.state_names:
            feeds["state_in_" + n] = np.concatenate([s[n] for s in states], axis=0)
        outs = dict(zip(self.outputs, self.sess.run(self.outputs, feeds), strict=True))
        new = [{n: outs["state_out_" + n][i : i + 1] for n in self.state_names} for i in range(len(states))]
        return [outs["logits"][i] for i in range(len(states))], new


@dataclass
class _Branch:
    state: dict[str, np.ndarray]
    doubled: int = 0


def _match(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=ATOL))


def check_session(ref: Reference, log: SessionLog) -> Counts:
    """Judge one session's log (see the module docstring)."""
    c = Counts(sessions=1, missing=log.missing)
    if log.missing:
        c.faults.append(f"{log.name}: {log.missing} acknowledged step(s) missing on the server")
    branches = [_Branch(ref.zero())]
    acked: list[dict[str, np.ndarray]] = [ref.zero()]  # the state after each acknowledged step, in order
    for k, ev in enumerate(log.events):
        if ev.output is None:
            c.unknown_outcomes += 1
            _, once = ref.apply([b.state for b in branches], ev.tokens)
            _, twice = ref.apply(once, ev.tokens)
            branches = (
                branches
                + [_Branch(s, b.doubled) for b, s in zip(branches, once, strict=True)]
                + [_Branch(s, b.doubled + 1) for b, s in zip(branches, twice, strict=True)]
            )
            if len(branches) > MAX_BRANCHES:
                c.unchecked += sum(e.output is not None for e in log.events[k:])
                return c
            continue
        outs, new = ref.apply([b.state for b in branches], ev.tokens)
        hits = [(b, s) for b, o, s in zip(branches, outs, new, strict=True) if _match(o, ev.output)]
        if hits:
            best, state = min(hits, key=lambda h: h[0].doubled)
            if best.doubled:
                c.doubled += best.doubled
                c.faults.append(f"{log.name} event {k}: an unacknowledged chunk was applied twice")
            c.steps_checked += 1
            branches = [_Branch(state)]
            acked.append(state)
            continue
        found = _diagnose(ref, ev, branches, acked, c, f"{log.name} event {k}")
        if found is None:
            c.diverged += 1
            c.faults.append(f"{log.name} event {k}: output matches no history of the acknowledged chunks")
            c.unchecked += sum(e.output is not None for e in log.events[k + 1 :])
            return c
        c.steps_checked += 1
        branches = [_Branch(found)]
        acked.append(found)
    return c


def _diagnose(ref, ev, branches, acked, c: Counts, where: str):
    """Explain an acknowledged output no candidate state gives; returns the state after it, or None."""
    # The chunk itself applied twice (a retry applied again).
    _, once = ref.apply([b.state for b in branches], ev.tokens)
    outs, twice = ref.apply(once, ev.tokens)
    for o, s in zip(outs, twice, strict=True):
        if _match(o, ev.output):
            c.doubled += 1
            c.faults.append(f"{where}: chunk applied twice")
            return s
    # The server went back to an earlier acknowledged state: the steps after it are lost.
    for back in range(1, len(acked)):
        (o,), (s,) = ref.apply([acked[-1 - back]], ev.tokens)
        if _match(o, ev.output):
            c.lost += back
            c.faults.append(
                f"{where}: applied on the state of {back} acknowledged step(s) earlier ({back} lost)"
            )
            return s
    return None


def check(ref: Reference, logs: list[SessionLog]) -> Counts:
    """Judge every session; the sum of their counts."""
    total = Counts()
    for log in logs:
        total.add(check_session(ref, log))
    return total
