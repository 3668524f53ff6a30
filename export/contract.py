"""Torch-free check of any ONNX file against the rnnserve state contract (docs/state-contract.md).

Works on our exports and on users' own models: it needs only onnx, onnxruntime and numpy.

Structure: every ``state_in_<name>`` input has a ``state_out_<name>`` output of the same dtype and shape
(and vice versa); axis 0 of every input and output is symbolic (the batch axis); state dims other than the
batch axis are static; ``rnnserve.initial_state.<name>`` metadata, when present, decodes to a row of the
state's shape.

Behaviour (run in ONNX Runtime): the model runs at batch 1 and 3; rows of a batch are independent (a batch
equals each row run alone -- what cross-session batching relies on); for sequence models (axis 1 named
``time``) the time axis is really dynamic (T = 1 and T = 100 on one session) and a stream cut into random
chunks, with the state carried between them, equals one pass.

Tolerances: data outputs max abs <= ``tol``; states max abs <= ``tol * max(1, max |reference|)``, because
an LSTM cell state is unbounded and float32 rounding grows with its magnitude.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from service.core.selfcheck import chunk_bounds  # one splitter for export checks and the server's

STATE_IN, STATE_OUT = "state_in_", "state_out_"
TIME = "time"


@dataclass(frozen=True)
class CheckResult:
    """One named check: passed or not, the measured max abs difference (if numeric), and a detail."""

    name: str
    passed: bool
    max_abs: float | None = None
    detail: str = ""


@dataclass
class Report:
    """All checks run on one model."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed (and at least one ran)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    def add(self, check: CheckResult) -> None:
        """Append a check result."""
        self.checks.append(check)

    def extend(self, other: Report) -> None:
        """Append all of another report's checks."""
        self.checks.extend(other.checks)

    def failures(self) -> list[CheckResult]:
        """Return the failed checks."""
        return [c for c in self.checks if not c.passed]

    def format(self) -> str:
        """Format as a human-readable table, one line per check."""
        lines = []
        for c in self.checks:
            diff = "" if c.max_abs is None else f"  max_abs={c.max_abs:.3g}"
            lines.append(f"{'PASS' if c.passed else 'FAIL'}  {c.name}{diff}  {c.detail}".rstrip())
        return "\n".join(lines)


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, numpy dtype and shape (str = symbolic dim, None = unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ContractSpec:
    """What the contract reads off a model: data tensors, state pairs, time axis and metadata."""

    data_inputs: tuple[TensorInfo, ...]
    data_outputs: tuple[TensorInfo, ...]
    states: tuple[TensorInfo, ...]  # named without the prefix, shape including the batch axis
    time_axis: bool
    metadata: dict[str, str]
    problems: tuple[str, ...]  # structural violations; empty when the model follows the contract

    @property
    def vocabulary(self) -> list[str] | None:
        """The token vocabulary from ``rnnserve.vocabulary``, if any."""
        raw = self.metadata.get("rnnserve.vocabulary")
        return None if raw is None else list(json.loads(raw))


def versions(model_dir: Path) -> list[int]:
    """Version directories of one model (positive integer names, section 1 of the contract), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), tuple(dims))


def initial_state_row(metadata: Mapping[str, str], name: str) -> np.ndarray | None:
    """Decode ``rnnserve.initial_state.<name>`` (base64 of a .npy holding one row), or None if absent."""
    raw = metadata.get(f"rnnserve.initial_state.{name}")
    if raw is None:
        return None
    return np.load(io.BytesIO(base64.b64decode(raw)), allow_pickle=False)


def read_contract(model: onnx.ModelProto) -> ContractSpec:
    """Read the contract view of a model and list every structural violation found."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_tensor_info(v) for v in model.graph.input if v.name not in inits]
    outputs = [_tensor_info(v) for v in model.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    problems: list[str] = []
    ins = {t.name[len(STATE_IN) :]: t for t in inputs if t.name.startswith(STATE_IN)}
    outs = {t.name[len(STATE_OUT) :]: t for t in outputs if t.name.startswith(STATE_OUT)}
    for name in sorted(set(ins) ^ set(outs)):
        side = "input state_in_" if name in ins else "output state_out_"
        problems.append(f"state {name!r}: {side}{name} has no partner")
    states = []
    for name in sorted(set(ins) & set(outs)):
        a, b = ins[name], outs[name]
        if a.dtype != b.dtype:
            problems.append(f"state {name!r}: input dtype {a.dtype} != output dtype {b.dtype}")
        if len(a.shape) != len(b.shape) or any(
            isinstance(x, int) and isinstance(y, int) and x != y
            for x, y in zip(a.shape[1:], b.shape[1:], strict=False)
        ):
            problems.append(f"state {name!r}: input shape {a.shape} != output shape {b.shape}")
        if any(not isinstance(d, int) for d in a.shape[1:]):
            problems.append(f"state {name!r}: dims after the batch axis must be static, got {a.shape}")
        row = initial_state_row(meta, name)
        if row is not None and tuple(row.shape) != tuple(a.shape[1:]):
            problems.append(f"state {name!r}: initial state row shape {row.shape} != {a.shape[1:]}")
        states.append(TensorInfo(name, a.dtype, a.shape))
    for t in inputs + outputs:
        if not t.shape:
            problems.append(f"{t.name}: scalar; axis 0 must be the batch axis")
        elif isinstance(t.shape[0], int):
            problems.append(f"{t.name}: batch axis (axis 0) must be dynamic, got static {t.shape[0]}")
    data_in = tuple(t for t in inputs if not t.name.startswith(STATE_IN))
    data_out = tuple(t for t in outputs if not t.name.startswith(STATE_OUT))
    if not data_in:
        problems.append("model has no data input")
    time_axis = any(len(t.shape) > 1 and t.shape[1] == TIME for t in data_in)
    return ContractSpec(data_in, data_out, tuple(states), time_axis, meta, tuple(problems))


def _concrete(shape: tuple[int | str | None, ...], batch: int, steps: int) -> tuple[int, ...]:
    out = []
    for i, d in enumerate(shape):
        if i == 0:
            out.append(batch)
        elif d == TIME:
            out.append(steps)
        elif isinstance(d, int):
            out.append(d)
        else:
            out.append(3)  # another symbolic dim: any small size will do
    return tuple(out)


def random_data(
    spec: ContractSpec, batch: int, steps: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random data inputs: token ids inside the vocabulary (or 0..1 without one), floats ~ N(0, 1)."""
    vocab = spec.vocabulary
    feeds = {}
    for t in spec.data_inputs:
        shape = _concrete(t.shape, batch, steps)
        if np.issubdtype(t.dtype, np.integer):
            feeds[t.name] = rng.integers(0, len(vocab) if vocab else 2, shape).astype(t.dtype)
        elif t.dtype == np.bool_:
            feeds[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def initial_states(spec: ContractSpec, batch: int) -> dict[str, np.ndarray]:
    """Return the initial state per the contract: zeros, or the declared ``rnnserve.initial_state.<name>``."""
    out = {}
    for s in spec.states:
        row = initial_state_row(spec.metadata, s.name)
        shape = _concrete(s.shape, batch, 1)
        out[s.name] = (
            np.zeros(shape, s.dtype) if row is None else np.broadcast_to(row.astype(s.dtype), shape).copy()
        )
    return out


def run(
    sess: ort.InferenceSession, spec: ContractSpec, data: dict[str, np.ndarray], state: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One ORT call: data + state in, (data outputs, new state) out."""
    feeds = dict(data)
    feeds.update({STATE_IN + k: v for k, v in state.items()})
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds), strict=True))
    return (
        {k: v for k, v in outs.items() if not k.startswith(STATE_OUT)},
        {k[len(STATE_OUT) :]: v for k, v in outs.items() if k.startswith(STATE_OUT)},
    )


def max_diff(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tol: float, scaled: bool
) -> tuple[float, bool, str]:
    """Compare two dicts of arrays; returns (max abs, within tolerance, worst tensor name)."""
    worst, ok, where = 0.0, True, ""
    for k, ref in b.items():
        x = np.asarray(a[k])
        if x.shape != ref.shape:
            return float("inf"), False, f"{k}: shape {x.shape} != {ref.shape}"
        if x.size == 0:
            continue
        d = float(np.max(np.abs(x.astype(np.float64) - ref.astype(np.float64))))
        limit = tol * (max(1.0, float(np.max(np.abs(ref)))) if scaled else 1.0)
        if not np.isfinite(d) or d > limit:
            ok = False
        if d > worst or not np.isfinite(d):
            worst, where = d, k
    return worst, ok, where


def check_streaming(
    sess: ort.InferenceSession,
    spec: ContractSpec,
    total: int,
    tol: float,
    rng: np.random.Generator,
    batch: int = 2,
    state: dict[str, np.ndarray] | None = None,
) -> CheckResult:
    """Check that a stream cut into random chunks, state carried between them, equals one pass."""
    data = random_data(spec, batch, total, rng)
    state0 = state if state is not None else initial_states(spec, batch)
    full_out, full_state = run(sess, spec, data, state0)
    st = state0
    pieces: dict[str, list[np.ndarray]] = {k: [] for k in full_out}
    bounds = chunk_bounds(total, rng)
    for lo, hi in bounds:
        out, st = run(sess, spec, {k: v[:, lo:hi] for k, v in data.items()}, st)
        for k, v in out.items():
            pieces[k].append(v)
    chunked = {k: np.concatenate(v, 1) for k, v in pieces.items()}
    d_out, ok_out, w_out = max_diff(chunked, full_out, tol, scaled=False)
    d_st, ok_st, w_st = max_diff(st, full_state, tol, scaled=True)
    sizes = [hi - lo for lo, hi in bounds]
    return CheckResult(
        f"streaming invariance (T={total}, chunks {sizes})",
        ok_out and ok_st,
        max(d_out, d_st),
        f"worst: {w_out if d_out >= d_st else w_st}",
    )


def check_contract(model: str | Path | bytes | onnx.ModelProto, tol: float = 1e-5, seed: int = 0) -> Report:
    """Run every structural and behavioural check of the contract on one model; never raises."""
    proto = (
        model
        if isinstance(model, onnx.ModelProto)
        else (onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
    )
    report = Report()
    spec = read_contract(proto)
    report.add(
        CheckResult(
            "structure (state pairs, batch axis, static state dims)",
            not spec.problems,
            detail="; ".join(spec.problems)
            or f"{len(spec.states)} state pair(s): {', '.join(s.name for s in spec.states)}",
        )
    )
    if spec.problems:
        return report
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is a failed check, reported with its message
        report.add(CheckResult("loads in ONNX Runtime", False, detail=str(exc)))
        return report
    rng = np.random.default_rng(seed)
    steps = 4 if spec.time_axis else 1
    # Batch independence, from states reached by a warm-up chunk (so rows hold different, realistic states).
    _, warm = run(sess, spec, random_data(spec, 3, steps, rng), initial_states(spec, 3))
    data = random_data(spec, 3, steps, rng)
    together_out, together_st = run(sess, spec, data, warm)
    alone = [
        run(
            sess, spec, {k: v[i : i + 1] for k, v in data.items()}, {k: v[i : i + 1] for k, v in warm.items()}
        )
        for i in range(3)
    ]
    alone_out = {k: np.concatenate([a[0][k] for a in alone]) for k in together_out}
    alone_st = {k: np.concatenate([a[1][k] for a in alone]) for k in together_st}
    d1, ok1, _ = max_diff(alone_out, together_out, tol, scaled=False)
    d2, ok2, _ = max_diff(alone_st, together_st, tol, scaled=True)
    report.add(CheckResult("batch rows independent (B=3 == 3 x B=1)", ok1 and ok2, max(d1, d2)))
    if spec.time_axis:
        shapes_ok, detail = True, []
        for t in (1, 100):
            out, _ = run(sess, spec, random_data(spec, 2, t, rng), initial_states(spec, 2))
            for k, v in out.items():
                good = v.shape[:2] == (2, t) and bool(np.all(np.isfinite(v)))
                shapes_ok &= good
                detail.append(f"{k}{v.shape}")
        report.add(
            CheckResult(
                "dynamic time axis (T=1 and T=100 on one session)", shapes_ok, detail=", ".join(detail)
            )
        )
        report.add(check_streaming(sess, spec, 150, tol, rng))
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m export.contract model.onnx`` -- exit 0 when the model follows the contract."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = check_contract(args.model, args.tol, args.seed)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
