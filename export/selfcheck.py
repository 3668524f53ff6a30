"""Load-time self-check of a model: it must carry its state, and its batch rows must be independent.

A pure function for the server to call before it serves a model version (torch-free: numpy and the
contract reader only). Given a runner (an ``onnxruntime.InferenceSession`` or anything with the same
``run(output_names, feeds)``) and the parsed contract (``export.contract.read_contract``), it runs one short
random sequence:

- at batch 1 and at batch 3 (the same row first, two other random rows after it): row 0 must come out the
  same, or the model mixes the rows of a batch, which the server's cross-session batching cannot allow;
- for sequence models (a ``time`` axis): the batch-3 sequence in one pass and cut into random chunks with the
  state carried between them: outputs and final state must agree, or the model does not carry its state
  (for example ``state_out = state_in``) or looks at the whole chunk at once (for example it normalises
  over time), and a stream served chunk by chunk would come out different from one pass.

The verdict says why in one line. Tolerances: data outputs max abs <= ``tol``; states max abs <=
``tol * max(1, max |reference|)`` (an LSTM cell state is unbounded and float32 rounding grows with it).
NaN where the reference is NaN counts as equal (a model may legitimately produce non-finite values).

    verdict = self_check(session, read_contract(onnx.load(path)))
    if not verdict.ok: log.warning("%s v%d not served: %s", name, version, verdict.reason)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from export.contract import (
    STATE_IN,
    STATE_OUT,
    ContractSpec,
    chunk_bounds,
    initial_states,
    random_data,
)

DEFAULT_TOL = 1e-4  # looser than export's 1e-5: ONNX Runtime's kernels may block a batch of 3 differently
DEFAULT_STEPS = 24


class Runner(Protocol):
    """What the check needs of an ONNX Runtime session."""

    def run(self, output_names: list[str], input_feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on ``input_feed`` and return ``output_names``."""
        ...


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`self_check`: serve or not, why (one line), and the largest difference measured."""

    ok: bool
    reason: str
    max_abs: float = 0.0


def _run(
    runner: Runner, spec: ContractSpec, data: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    outs = [t.name for t in spec.data_outputs] + [STATE_OUT + s.name for s in spec.states]
    feeds = {**data, **{STATE_IN + k: v for k, v in state.items()}}
    got = dict(zip(outs, runner.run(outs, feeds), strict=True))
    return (
        {t.name: got[t.name] for t in spec.data_outputs},
        {s.name: got[STATE_OUT + s.name] for s in spec.states},
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
        a, b = g.astype(np.float64), r.astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        d = np.where(both_nan | (a == b), 0.0, np.abs(a - b))  # a == b also covers equal infinities
        d = float(np.nan_to_num(d, nan=np.inf).max())
        finite = np.abs(b[np.isfinite(b)])
        limit = tol * (max(1.0, float(finite.max()) if finite.size else 1.0) if scaled else 1.0)
        if d > limit and not over:
            over = k
        worst = max(worst, d)
    return _Diff(worst, over)


def self_check(
    runner: Runner,
    spec: ContractSpec,
    *,
    tol: float = DEFAULT_TOL,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> Verdict:
    """Run the checks of the module docstring; never raises (a failing run is a refusal with its error)."""
    if spec.problems:
        return Verdict(False, f"breaks the state contract: {spec.problems[0]}")
    rng = np.random.default_rng(seed)
    T = steps if spec.time_axis else 1
    try:
        data = random_data(spec, 3, T, rng)
        state0 = initial_states(spec, 3)
        out3, st3 = _run(runner, spec, data, state0)
        out1, st1 = _run(
            runner, spec, {k: v[:1] for k, v in data.items()}, {k: v[:1] for k, v in state0.items()}
        )
        row0 = _compare(out1, {k: v[:1] for k, v in out3.items()}, tol, scaled=False)
        row0_st = _compare(st1, {k: v[:1] for k, v in st3.items()}, tol, scaled=True)
        batch_diff = max(row0.worst, row0_st.worst)
        if row0.over or row0_st.over:
            return Verdict(
                False,
                f"batch rows are not independent: {row0.over or row0_st.over} of a row differs by "
                f"{batch_diff:.3g} between batch 1 and batch 3 (tolerance {tol:g})",
                batch_diff,
            )
        if not spec.time_axis:
            return Verdict(True, f"batch 1 == batch 3 (max abs {batch_diff:.2g}); no time axis", batch_diff)
        bounds = chunk_bounds(T, rng)
        st = state0
        pieces: dict[str, list[np.ndarray]] = {k: [] for k in out3}
        for lo, hi in bounds:
            out, st = _run(runner, spec, {k: v[:, lo:hi] for k, v in data.items()}, st)
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
