"""The state contract as the server reads it: an ONNX Runtime session -> `ModelSpec`, or `ContractError`.

docs/state-contract.md is the prose; this module is the one reader of it in the server. A model that breaks
it is refused with a message that says what and where.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from service.core.runtime import ORT_DTYPES, Runtime
from service.core.types import (
    INITIAL_STATE_KEY,
    STATE_IN,
    STATE_OUT,
    TIME_DIM,
    ContractError,
    ControlSpec,
    ModelConfig,
    ModelSpec,
    StateSpec,
    TensorSpec,
)


def _dims(shape: list[Any]) -> list[int | str | None]:
    return [d if isinstance(d, int) else (d if isinstance(d, str) and d else None) for d in shape]


def _dtype(type_str: str, name: str) -> np.dtype:
    try:
        return ORT_DTYPES[type_str]
    except KeyError:
        raise ContractError(f"tensor {name!r} has unsupported type {type_str}") from None


def _initial_state(
    meta: dict[str, str], name: str, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray | None:
    blob = meta.get(INITIAL_STATE_KEY + name)
    if blob is None:
        return None
    try:
        array = np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False)
    except Exception as exc:
        raise ContractError(f"metadata {INITIAL_STATE_KEY}{name} is not a base64 .npy file: {exc}") from None
    if tuple(array.shape) != shape:
        raise ContractError(
            f"initial state {name!r} has shape {array.shape}, expected {shape} (no batch axis)"
        )
    return np.ascontiguousarray(array.astype(dtype, copy=False))


_Table = dict[str, tuple[np.dtype, list[int | str | None]]]


def _check_batch_axes(ins: _Table, outs: _Table) -> None:
    for kind, table in (("input", ins), ("output", outs)):
        for tname, (_, dims) in table.items():
            if not dims:
                raise ContractError(f"{kind} {tname!r} is a scalar; axis 0 must be the batch axis")
            if isinstance(dims[0], int):
                raise ContractError(
                    f"{kind} {tname!r} has a static axis 0 ({dims[0]}); it must be the dynamic batch"
                )


def _states(ins: _Table, outs: _Table, meta: dict[str, str]) -> tuple[StateSpec, ...]:
    """Pair `state_in_<name>` with `state_out_<name>` and check dtypes and static shapes."""
    states = []
    for in_name, (dtype, dims) in ins.items():
        if not in_name.startswith(STATE_IN):
            continue
        key = in_name[len(STATE_IN) :]
        pair = outs.get(STATE_OUT + key)
        if pair is None:
            raise ContractError(f"state input {in_name!r} has no output {STATE_OUT + key!r}")
        if pair[0] != dtype:
            raise ContractError(f"state {key!r}: input dtype {dtype} differs from output dtype {pair[0]}")
        rest = dims[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ContractError(
                f"state {key!r} has dynamic dims {dims}; state dims other than batch must be static"
            )
        out_rest = pair[1][1:]
        if all(isinstance(d, int) for d in out_rest) and list(out_rest) != list(rest):
            raise ContractError(f"state {key!r}: input shape {dims} differs from output shape {pair[1]}")
        shape = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        states.append(StateSpec(key, dtype, shape, _initial_state(meta, key, dtype, shape)))
    for out_name in outs:
        if out_name.startswith(STATE_OUT) and STATE_IN + out_name[len(STATE_OUT) :] not in ins:
            raise ContractError(
                f"state output {out_name!r} has no input {STATE_IN + out_name[len(STATE_OUT) :]!r}"
            )
    return tuple(states)


def _vocabulary(meta: dict[str, str]) -> tuple[str, ...] | None:
    if "rnnserve.vocabulary" not in meta:
        return None
    try:
        vocab = json.loads(meta["rnnserve.vocabulary"])
    except json.JSONDecodeError as exc:
        raise ContractError(f"metadata rnnserve.vocabulary is not JSON: {exc}") from None
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise ContractError("metadata rnnserve.vocabulary must be a JSON list of strings")
    return tuple(vocab)


def _controls(sess: Any, config: ModelConfig) -> tuple[ControlSpec, ...]:
    """Read the inputs config.yaml names as control inputs (docs/state-contract.md, "Control inputs")."""
    graph = {i.name: i for i in sess.get_inputs()}
    controls = []
    for c in config.control_inputs:
        node = graph.get(c.name)
        if node is None:
            raise ContractError(
                f"config.yaml: control input {c.name!r} is not an input of the model; inputs: {sorted(graph)}"
            )
        if node.type == "tensor(string)" and c.kind == "CONTROL_SEQUENCE_CORRID":
            dtype = np.dtype(object)
        else:
            dtype = _dtype(node.type, c.name)
        if c.name.startswith(STATE_IN):
            raise ContractError(f"control input {c.name!r}: a state input cannot be a control input")
        dims = _dims(node.shape)
        timed = len(dims) > 1 and dims[1] == TIME_DIM
        rest = dims[2:] if timed else dims[1:]
        if not dims or isinstance(dims[0], int) or not all(isinstance(d, int) for d in rest):
            raise ContractError(
                f"control input {c.name!r} has shape {dims}; expected [batch, 1], [batch] or "
                "[batch, time, ...] with static dims after batch (and time)"
            )
        if c.kind == "CONTROL_SEQUENCE_CORRID" and dtype.kind not in "iuO":
            raise ContractError(
                f"control input {c.name!r} (CORRID) must be an integer or string tensor, got {dtype.name}"
            )
        if c.kind != "CONTROL_SEQUENCE_CORRID" and dtype.kind not in "biuf":
            raise ContractError(
                f"control input {c.name!r} must be a bool or numeric tensor, got {dtype.name}"
            )
        if c.kind != "CONTROL_SEQUENCE_CORRID" and not all(isinstance(v, int | float) for v in c.false_true):
            raise ContractError(
                f"control input {c.name!r}: false_true must be two numbers, got {list(c.false_true)}"
            )
        controls.append(
            ControlSpec(c.name, c.kind, dtype, tuple(int(d) for d in rest), timed, c.false_true)  # type: ignore[arg-type]
        )
    return tuple(controls)


def describe(runtime: Runtime, name: str, version: int, config: ModelConfig) -> ModelSpec:
    """Read and validate one loaded model against the state contract; raises `ContractError`."""
    sess = runtime.session
    controls = _controls(sess, config)
    control_names = {c.name for c in controls}
    ins = {
        i.name: (_dtype(i.type, i.name), _dims(i.shape))
        for i in sess.get_inputs()
        if i.name not in control_names
    }
    outs = {o.name: (_dtype(o.type, o.name), _dims(o.shape)) for o in sess.get_outputs()}
    _check_batch_axes(ins, outs)
    meta = runtime.metadata
    states = _states(ins, outs, meta)
    data_in = [(n, d) for n, d in ins.items() if not n.startswith(STATE_IN)]
    data_out = [(n, d) for n, d in outs.items() if not n.startswith(STATE_OUT)]
    if not data_in or not data_out:
        raise ContractError("a model needs at least one data input and one data output")
    timed = [len(dims) > 1 and dims[1] == TIME_DIM for _, (_, dims) in data_in]
    if any(timed) and not all(timed):
        raise ContractError("either every data input has a time axis (axis 1 named 'time') or none has")
    time_axis = all(timed)
    if not time_axis and any(c.time_axis for c in controls):
        raise ContractError("a control input has a time axis but the data inputs have none")

    def spec(n: str, dtype: np.dtype, dims: list[int | str | None]) -> TensorSpec:
        # An output has a time axis when its axis 1 is symbolic (ORT may name computed dims itself).
        timed_here = time_axis and len(dims) > 1 and not isinstance(dims[1], int)
        return TensorSpec(n, dtype, tuple(d if isinstance(d, int) else None for d in dims), timed_here)

    return ModelSpec(
        name=name,
        version=version,
        inputs=tuple(spec(n, *d) for n, d in data_in),
        outputs=tuple(spec(n, *d) for n, d in data_out),
        states=states,
        time_axis=time_axis,
        metadata=dict(meta),
        vocabulary=_vocabulary(meta),
        description=config.description or meta.get("rnnserve.description", ""),
        config=config,
        path=runtime.path,
        controls=controls,
    )
