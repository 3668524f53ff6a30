"""Load-time self-check of a model: it must carry its state, and its batch rows must be independent.

The server runs it on every model version before serving it (`service.core.registry`); `export.selfcheck`
runs the same function on a parsed ONNX file. It needs numpy only. Given a runner (an
``onnxruntime.InferenceSession`` or anything with the same ``run(output_names, feeds)``) and a `Probe` (what
the check needs to know of a model; `probe_of_spec` builds it from the server's `ModelSpec`), it runs one
short random sequence:

- at batch 1 and at batch 3 (the same row first, two other random rows after it): row 0 must come out the
  same, or the model mixes the rows of a batch, which the server's cross-session batching cannot allow;
- for sequence models (a ``time`` axis): the batch-3 sequence in one pass and cut into random chunks with the
  state carried between them: outputs and final state must agree, or the model does not carry its state
  (for example ``state_out = state_in``) or looks at the whole chunk at once (for example it normalises
  over time), and a stream served chunk by chunk would come out different from one pass.

Control inputs (sequence start, end, ready, correlation id; see docs/state-contract.md) are filled as the
server fills them: start on the first step of the sequence only, ready on every step, end never, and one
correlation id per row.

The verdict says why in one line. Tolerances: data outputs max abs <= ``tol``; states max abs <=
``tol * max(1, max |reference|)`` (an LSTM cell state is unbounded and float32 rounding grows with it).
NaN where the reference is NaN counts as equal (a model may legitimately produce non-finite values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.types import SELF_CHECK_TOLERANCE, STATE_IN, STATE_OUT, ModelSpec

DEFAULT_TOL = SELF_CHECK_TOLERANCE
DEFAULT_STEPS = 24
OTHER_DIM = 3  # size given to a symbolic dim that is neither batch nor time


class Runner(Protocol):
    """What the check needs of an ONNX Runtime session."""

    def run(self, output_names: list[str], input_feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on ``input_feed`` and return ``output_names``."""
        ...


@dataclass(frozen=True)
class ProbeTensor:
    """A tensor as the check sees it: per-row dims (no batch axis; None = symbolic), axis 1 time or not."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]
    timed: bool = False
    initial: np.ndarray | None = None  # states: the declared initial row (None = zeros)


# Fills the control inputs of one run: (batch, steps, first step is the sequence start) -> feeds.
ControlFeeds = Callable[[int, int, bool], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Probe:
    """What the check needs of a model: data inputs and outputs, states, time axis, vocabulary size."""

    inputs: tuple[ProbeTensor, ...]
    outputs: tuple[str, ...]
    states: tuple[ProbeTensor, ...]
    time_axis: bool
    vocab_size: int | None = None
    problems: tuple[str, ...] = ()  # structural violations found before the check; refused at once
    controls: ControlFeeds | None = None


def probe_of_spec(spec: ModelSpec, controls: ControlFeeds | None = None) -> Probe:
    """Build the probe of a model version the server has read (`service.core.contract.describe`)."""
    return Probe(
        inputs=tuple(ProbeTensor(t.name, t.dtype, t.shape[1:], t.time_axis) for t in spec.inputs),
        outputs=tuple(t.name for t in spec.outputs),
        states=tuple(ProbeTensor(s.name, s.dtype, s.shape, False, s.initial) for s in spec.states),
        time_axis=spec.time_axis,
        vocab_size=len(spec.vocabulary) if spec.vocabulary is not None else None,
        controls=controls,
    )


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`self_check`: serve or not, why (one line), and the largest difference measured."""

    ok: bool
    reason: str
    max_abs: float = 0.0


def _shape(t: ProbeTensor, batch: int, steps: int) -> tuple[int, ...]:
    dims = [steps if (i == 0 and t.timed) else (OTHER_DIM if d is None else d) for i, d in enumerate(t.dims)]
    return (batch, *dims)


def random_inputs(probe: Probe, batch: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random data inputs: token ids inside the vocabulary (or 0..1 without one), floats ~ N(0, 1)."""
    feeds = {}
    for t in probe.inputs:
        shape = _shape(t, batch, steps)
        if np.issubdtype(t.dtype, np.integer):
            feeds[t.name] = rng.integers(0, probe.vocab_size or 2, shape).astype(t.dtype)
        elif t.dtype == np.bool_:
            feeds[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def initial_state(probe: Probe, batch: int) -> dict[str, np.ndarray]:
    """Return the initial state of ``batch`` rows: zeros, or each state's declared initial row."""
    out = {}
    for s in probe.states:
        shape = _shape(s, batch, 1)
        out[s.name] = (
            np.zeros(shape, s.dtype)
            if s.initial is None
            else np.broadcast_to(s.initial.astype(s.dtype), shape).copy()
        )
    return out


def chunk_bounds(total: int, rng: np.random.Generator, pieces: int = 6) -> list[tuple[int, int]]:
    """Split ``range(total)`` at random into up to ``pieces`` non-empty chunks, one of them of length 1."""
    cuts = sorted(
        set(rng.choice(np.arange(1, total), size=min(pieces - 1, total - 1), replace=False).tolist())
    )
    if total > 2 and cuts and cuts[0] != 1:
        cuts = [1, *cuts]  # a one-step chunk: the smallest a client sends
    edges = [0, *cuts, total]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _run(
    runner: Runner,
    probe: Probe,
    data: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    start: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    outs = list(probe.outputs) + [STATE_OUT + s.name for s in probe.states]
    feeds = {**data, **{STATE_IN + k: v for k, v in state.items()}}
    if probe.controls is not None:
        first = next(iter(data.values()))
        feeds.update(probe.controls(first.shape[0], first.shape[1] if probe.time_axis else 1, start))
    got = dict(zip(outs, runner.run(outs, feeds), strict=True))
    return (
        {name: got[name] for name in probe.outputs},
        {s.name: got[STATE_OUT + s.name] for s in probe.states},
    )


@dataclass(frozen=True)
class _Diff:
    worst: float  # largest absolute difference
    over: str  # first tensor over its limit ("" if none)


def _compare(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: float, scaled: bool) -> _Diff:
    worst, over = 0.0, ""
    for k, r in ref.items():
        g = np.asarray(got[k])
        if g.shape != r.shape:
            return _Diff(float("inf"), f"{k} (shape {g.shape} vs {r.shape})")
        if g.size == 0:
            continue
        if g.dtype.kind in "OSU":  # string outputs: exact
            d = 0.0 if np.array_equal(g, r) else float("inf")
            limit = 0.0
        else:
            a, b = g.astype(np.float64), r.astype(np.float64)
            both_nan = np.isnan(a) & np.isnan(b)
            diff = np.where(both_nan | (a == b), 0.0, np.abs(a - b))  # a == b also covers equal infinities
            d = float(np.nan_to_num(diff, nan=np.inf).max())
            finite = np.abs(b[np.isfinite(b)])
            limit = tol * (max(1.0, float(finite.max()) if finite.size else 1.0) if scaled else 1.0)
        if d > limit and not over:
            over = k
        worst = max(worst, d)
    return _Diff(worst, over)


def _rows(arrays: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in arrays.items()}


def self_check(
    runner: Runner,
    probe: Probe,
    *,
    tol: float = DEFAULT_TOL,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> Verdict:
    """Run the checks of the module docstring; never raises (a failing run is a refusal with its error)."""
    if probe.problems:
        return Verdict(False, f"breaks the state contract: {probe.problems[0]}")
    rng = np.random.default_rng(seed)
    T = steps if probe.time_axis else 1
    try:
        data = random_inputs(probe, 3, T, rng)
        state0 = initial_state(probe, 3)
        out3, st3 = _run(runner, probe, data, state0, True)
        out1, st1 = _run(runner, probe, _rows(data, 1), _rows(state0, 1), True)
        row0 = _compare(out1, _rows(out3, 1), tol, scaled=False)
        row0_st = _compare(st1, _rows(st3, 1), tol, scaled=True)
        batch_diff = max(row0.worst, row0_st.worst)
        if row0.over or row0_st.over:
            return Verdict(
                False,
                f"batch rows are not independent: {row0.over or row0_st.over} of a row differs by "
                f"{batch_diff:.3g} between batch 1 and batch 3 (tolerance {tol:g})",
                batch_diff,
            )
        if not probe.time_axis:
            return Verdict(True, f"batch 1 == batch 3 (max abs {batch_diff:.2g}); no time axis", batch_diff)
        bounds = chunk_bounds(T, rng)
        st = state0
        pieces: dict[str, list[np.ndarray]] = {k: [] for k in out3}
        for lo, hi in bounds:
            out, st = _run(runner, probe, {k: v[:, lo:hi] for k, v in data.items()}, st, lo == 0)
            for k, v in out.items():
                pieces[k].append(v)
        chunked = {k: np.concatenate(v, 1) for k, v in pieces.items()}
    except Exception as exc:  # noqa: BLE001 - any runtime failure refuses the model, with its message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Verdict(False, f"run failed: {type(exc).__name__}: {first}"[:300], float("inf"))
    d_out = _compare(chunked, out3, tol, scaled=False)
    d_st = _compare(st, st3, tol, scaled=True)
    sizes = [hi - lo for lo, hi in bounds]
    worst = max(d_out.worst, d_st.worst, batch_diff)
    if d_out.over or d_st.over:
        what = d_out.over or f"state {d_st.over}"
        return Verdict(
            False,
            f"outputs depend on the chunking: {what} differs by {max(d_out.worst, d_st.worst):.3g} between "
            f"one pass of T={T} and chunks {sizes} (tolerance {tol:g}); the state is not carried, or the "
            "model looks across time steps within a chunk",
            worst,
        )
    return Verdict(
        True,
        f"one pass == chunks {sizes} (T={T}) and batch 1 == batch 3 (max abs {worst:.2g})",
        worst,
    )
