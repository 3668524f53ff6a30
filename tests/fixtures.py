"""Tiny ONNX models that follow the state contract (docs/DESIGN.md), built with onnx.helper (no torch).

Tests never need a trained model: these builders make small, random-weight models in milliseconds.
Each builder writes `<repository>/<name>/<version>/model.onnx` and returns the path.

- `token_lstm`: tokens int64 (B, T) -> embedding -> L fused LSTM layers -> logits float32 (B, T, V);
  states `h`, `c` (B, L, H). Carries a vocabulary in its metadata, like the exported char models.
- `numeric_gru`: x float32 (B, T, F) -> fused GRU (linear_before_reset=1) -> y float32 (B, T, O);
  state `h` (B, 1, H).
- `accumulator`: a user's own stateful model without a time axis: x int32 (B, 1);
  state_out_acc = state_in_acc + x; y = state_out_acc.
- `state_passthrough`, `normalised_over`: deliberately broken edits of a model (the state is not carried;
  an output normalised over time or over the batch), which the load-time self-check refuses.
- `dyna_sequence`: Triton's `simple_dyna_sequence` as ONNX, with control inputs START, END, READY, CORRID.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
DEFAULT_VOCAB = tuple("\n !\"#',-.0123456789:ABCDEFGabcdefgz|/[]")


def _write(model: onnx.ModelProto, repository: Path, name: str, version: int) -> Path:
    onnx.checker.check_model(model, full_check=True)
    out = Path(repository) / name / str(version) / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def _metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _stacked_state_layers(nodes: list, prefix: str, state: str, layers: int) -> list[str]:
    """Split a contract state (B, L, H) into L op-shaped states (1, B, H)."""
    nodes.append(helper.make_node("Transpose", [state], [f"{prefix}_t"], perm=[1, 0, 2]))  # (L, B, H)
    if layers == 1:
        return [f"{prefix}_t"]
    outs = [f"{prefix}_l{i}" for i in range(layers)]
    nodes.append(helper.make_node("Split", [f"{prefix}_t", f"{prefix}_split"], outs, axis=0))
    return outs


def _restack(nodes: list, parts: list[str], out: str) -> None:
    """Concatenate L op states (1, B, H) back into the contract's (B, L, H)."""
    src = parts[0]
    if len(parts) > 1:
        nodes.append(helper.make_node("Concat", parts, [f"{out}_cat"], axis=0))
        src = f"{out}_cat"
    nodes.append(helper.make_node("Transpose", [src], [out], perm=[1, 0, 2]))


def token_lstm(
    repository: Path,
    name: str = "tiny_lstm",
    version: int = 1,
    *,
    vocab: tuple[str, ...] = DEFAULT_VOCAB,
    hidden: int = 8,
    layers: int = 1,
    seed: int = 0,
    initial_c: np.ndarray | None = None,
) -> Path:
    """A token (char) LSTM following the contract; `initial_c` (L, H) declares a non-zero initial c."""
    rng = np.random.default_rng(seed)
    v, h = len(vocab), hidden
    inits = [
        _init("emb", rng.normal(0, 0.5, (v, h)).astype(np.float32)),
        _init("w_out", rng.normal(0, 0.5, (h, v)).astype(np.float32)),
        _init("b_out", rng.normal(0, 0.1, (v,)).astype(np.float32)),
        _init("sq1", np.array([1], np.int64)),
    ]
    if layers > 1:
        inits += [_init("h_split", np.ones(layers, np.int64)), _init("c_split", np.ones(layers, np.int64))]
    nodes = [
        helper.make_node("Gather", ["emb", "tokens"], ["e"], axis=0),  # (B, T, H)
        helper.make_node("Transpose", ["e"], ["x0"], perm=[1, 0, 2]),  # (T, B, H)
    ]
    h_in = _stacked_state_layers(nodes, "h", "state_in_h", layers)
    c_in = _stacked_state_layers(nodes, "c", "state_in_c", layers)
    x, h_out, c_out = "x0", [], []
    for i in range(layers):
        inits += [
            _init(f"W{i}", rng.normal(0, 0.4, (1, 4 * h, h)).astype(np.float32)),
            _init(f"R{i}", rng.normal(0, 0.4, (1, 4 * h, h)).astype(np.float32)),
            _init(f"B{i}", rng.normal(0, 0.1, (1, 8 * h)).astype(np.float32)),
        ]
        nodes.append(
            helper.make_node(
                "LSTM",
                [x, f"W{i}", f"R{i}", f"B{i}", "", h_in[i], c_in[i]],
                [f"Y{i}", f"Yh{i}", f"Yc{i}"],
                hidden_size=h,
            )
        )
        nodes.append(helper.make_node("Squeeze", [f"Y{i}", "sq1"], [f"x{i + 1}"]))  # (T, B, H)
        x = f"x{i + 1}"
        h_out.append(f"Yh{i}")
        c_out.append(f"Yc{i}")
    _restack(nodes, h_out, "state_out_h")
    _restack(nodes, c_out, "state_out_c")
    nodes += [
        helper.make_node("Transpose", [x], ["top"], perm=[1, 0, 2]),  # (B, T, H)
        helper.make_node("MatMul", ["top", "w_out"], ["proj"]),
        helper.make_node("Add", ["proj", "b_out"], ["logits"]),  # (B, T, V)
    ]
    state = ["batch", layers, h]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("state_in_h", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("state_in_c", TensorProto.FLOAT, state),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", v]),
            helper.make_tensor_value_info("state_out_h", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("state_out_c", TensorProto.FLOAT, state),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    props = {
        "rnnserve.family": "lstm",
        "rnnserve.task": "token",
        "rnnserve.vocabulary": json.dumps(list(vocab)),
        "rnnserve.data": "synthetic (random weights, test fixture)",
        "rnnserve.metrics": json.dumps({}),
        "rnnserve.description": f"tiny random-weight token LSTM (H={h}, L={layers}) for tests",
    }
    if initial_c is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(initial_c, np.float32).reshape(layers, h))
        props["rnnserve.initial_state.c"] = base64.b64encode(buf.getvalue()).decode()
    _metadata(model, props)
    return _write(model, repository, name, version)


def numeric_gru(
    repository: Path,
    name: str = "tiny_gru",
    version: int = 1,
    *,
    features: int = 3,
    hidden: int = 6,
    out_features: int = 2,
    seed: int = 1,
) -> Path:
    """A numeric GRU (torch.nn.GRU formulation: linear_before_reset=1) following the contract."""
    rng = np.random.default_rng(seed)
    h = hidden
    inits = [
        _init("W", rng.normal(0, 0.5, (1, 3 * h, features)).astype(np.float32)),
        _init("R", rng.normal(0, 0.5, (1, 3 * h, h)).astype(np.float32)),
        _init("B", rng.normal(0, 0.1, (1, 6 * h)).astype(np.float32)),
        _init("w_out", rng.normal(0, 0.5, (h, out_features)).astype(np.float32)),
        _init("sq1", np.array([1], np.int64)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),  # (T, B, F)
        helper.make_node("Transpose", ["state_in_h"], ["h0"], perm=[1, 0, 2]),  # (1, B, H)
        helper.make_node(
            "GRU", ["xt", "W", "R", "B", "", "h0"], ["Y", "Yh"], hidden_size=h, linear_before_reset=1
        ),
        helper.make_node("Squeeze", ["Y", "sq1"], ["ys"]),  # (T, B, H)
        helper.make_node("Transpose", ["ys"], ["top"], perm=[1, 0, 2]),  # (B, T, H)
        helper.make_node("MatMul", ["top", "w_out"], ["y"]),  # (B, T, O)
        helper.make_node("Transpose", ["Yh"], ["state_out_h"], perm=[1, 0, 2]),  # (B, 1, H)
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", features]),
            helper.make_tensor_value_info("state_in_h", TensorProto.FLOAT, ["batch", 1, h]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", out_features]),
            helper.make_tensor_value_info("state_out_h", TensorProto.FLOAT, ["batch", 1, h]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    _metadata(
        model,
        {
            "rnnserve.family": "gru",
            "rnnserve.task": "numeric",
            "rnnserve.data": "synthetic (random weights, test fixture)",
            "rnnserve.description": "tiny random-weight numeric GRU for tests",
        },
    )
    return _write(model, repository, name, version)


def accumulator(repository: Path, name: str = "accumulator", version: int = 1) -> Path:
    """A user's own stateful model, no time axis: state_out_acc = state_in_acc + x; y = state_out_acc."""
    nodes = [
        helper.make_node("Add", ["state_in_acc", "x"], ["state_out_acc"]),
        helper.make_node("Identity", ["state_out_acc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("state_in_acc", TensorProto.INT32, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("state_out_acc", TensorProto.INT32, ["batch", 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _write(model, repository, name, version)


DYNA_CONTROLS = """control_inputs:
  - {name: START, kind: CONTROL_SEQUENCE_START}
  - {name: END, kind: CONTROL_SEQUENCE_END}
  - {name: READY, kind: CONTROL_SEQUENCE_READY}
  - {name: CORRID, kind: CONTROL_SEQUENCE_CORRID}
"""


def dyna_sequence(
    repository: Path, name: str = "simple_dyna_sequence", *, string_id: str | None = None
) -> Path:
    """Triton's `simple_dyna_sequence` as ONNX: an int32 accumulator; its last output adds the sequence id.

    INPUT int32 (B, 1); control inputs START, END, READY int32 (B, 1) and CORRID (B, 1), uint64 -- or
    string when `string_id` is given: then the model adds `int(string_id)` at the end if CORRID equals it
    (ONNX cannot parse a string into a number), 0 for any other id. State `acc` int32 (B, 1):
    acc = INPUT if START else acc + INPUT (unchanged when not READY); OUTPUT = acc + END * CORRID.
    Also writes the model's config.yaml declaring the four control inputs.
    """
    i32 = TensorProto.INT32
    nodes = [
        helper.make_node("Cast", ["START"], ["start_b"], to=TensorProto.BOOL),
        helper.make_node("Cast", ["READY"], ["ready_b"], to=TensorProto.BOOL),
        helper.make_node("Add", ["state_in_acc", "INPUT"], ["summed"]),
        helper.make_node("Where", ["start_b", "INPUT", "summed"], ["acc"]),
        helper.make_node("Where", ["ready_b", "acc", "state_in_acc"], ["state_out_acc"]),
    ]
    if string_id is None:
        corrid_type = TensorProto.UINT64
        nodes.append(helper.make_node("Cast", ["CORRID"], ["corr"], to=i32))
    else:
        corrid_type = TensorProto.STRING
        nodes += [
            helper.make_node(
                "Constant",
                [],
                ["wanted"],
                value=helper.make_tensor("w", TensorProto.STRING, [], [string_id.encode()]),
            ),
            helper.make_node("Equal", ["CORRID", "wanted"], ["same"]),
            helper.make_node("Cast", ["same"], ["same_i"], to=i32),
            helper.make_node("Mul", ["same_i", "id_value"], ["corr"]),
        ]
    nodes += [
        helper.make_node("Mul", ["END", "corr"], ["at_end"]),
        helper.make_node("Add", ["state_out_acc", "at_end"], ["OUTPUT"]),
    ]
    inits = [] if string_id is None else [_init("id_value", np.array(int(string_id), np.int32))]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("INPUT", i32, ["batch", 1]),
            helper.make_tensor_value_info("START", i32, ["batch", 1]),
            helper.make_tensor_value_info("END", i32, ["batch", 1]),
            helper.make_tensor_value_info("READY", i32, ["batch", 1]),
            helper.make_tensor_value_info("CORRID", corrid_type, ["batch", 1]),
            helper.make_tensor_value_info("state_in_acc", i32, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("OUTPUT", i32, ["batch", 1]),
            helper.make_tensor_value_info("state_out_acc", i32, ["batch", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    path = _write(model, repository, name, 1)
    (repository / name / "config.yaml").write_text(DYNA_CONTROLS)
    return path


def timed_controls(repository: Path, name: str = "timed_controls") -> Path:
    """A sequence model whose control inputs have the time axis: START (B, T, 1) and END (B, T) float32.

    y = x + 100 * START + 1000 * END per step, x (B, T, 1); state `sum` (B, 1): the running sum of x, reset
    by a START anywhere in the chunk. Chunk-invariant only if START marks step 0 of the sequence alone (not
    the first step of every chunk), which is what the server promises.
    """
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["START", "hundred"], ["s100"]),
        helper.make_node("Unsqueeze", ["END", "two"], ["end3"]),
        helper.make_node("Mul", ["end3", "thousand"], ["e1000"]),
        helper.make_node("Add", ["x", "s100"], ["xs"]),
        helper.make_node("Add", ["xs", "e1000"], ["y"]),
        helper.make_node("ReduceMax", ["START"], ["started"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["one", "started"], ["keep"]),
        helper.make_node("Mul", ["keep", "state_in_sum"], ["kept"]),
        helper.make_node("ReduceSum", ["x", "one_axis"], ["chunk_sum"], keepdims=0),
        helper.make_node("Add", ["kept", "chunk_sum"], ["state_out_sum"]),
    ]
    inits = [
        _init("hundred", np.array(100, np.float32)),
        _init("thousand", np.array(1000, np.float32)),
        _init("one", np.array(1, np.float32)),
        _init("two", np.array([2], np.int64)),
        _init("one_axis", np.array([1], np.int64)),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("x", f32, ["batch", "time", 1]),
            helper.make_tensor_value_info("START", f32, ["batch", "time", 1]),
            helper.make_tensor_value_info("END", f32, ["batch", "time"]),
            helper.make_tensor_value_info("state_in_sum", f32, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", f32, ["batch", "time", 1]),
            helper.make_tensor_value_info("state_out_sum", f32, ["batch", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path = _write(model, repository, name, 1)
    (repository / name / "config.yaml").write_text(
        "control_inputs:\n  - {name: START, kind: start}\n  - {name: END, kind: end, false_true: [0, 1]}\n"
    )
    return path


def reroute(model: onnx.ModelProto, output: str, nodes) -> onnx.ModelProto:
    """Rename the producer of graph output ``output`` to ``<output>_raw``; ``nodes`` compute ``output``."""
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = f"{output}_raw"
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def state_passthrough(path: Path) -> onnx.ModelProto:
    """The LSTM fixture with state_out_h/c = state_in_h/c: it runs, but never carries its state."""
    model = onnx.load(str(path))
    for s in ("h", "c"):
        passthrough = helper.make_node("Identity", [f"state_in_{s}"], [f"state_out_{s}"])
        reroute(model, f"state_out_{s}", [passthrough])
    return model


def normalised_over(path: Path, axis: int) -> onnx.ModelProto:
    """The GRU fixture with y = y_raw - mean(y_raw over ``axis``): time (1) or batch (0)."""
    return reroute(
        onnx.load(str(path)),
        "y",
        [
            helper.make_node("ReduceMean", ["y_raw"], ["y_mean"], axes=[axis], keepdims=1),
            helper.make_node("Sub", ["y_raw", "y_mean"], ["y"]),
        ],
    )


def save(model: onnx.ModelProto, repository: Path, name: str, version: int = 1) -> Path:
    """Write an (edited) model as `<repository>/<name>/<version>/model.onnx`."""
    return _write(model, repository, name, version)


def run_whole(model_path: Path, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray] | None = None):
    """Run a contract model in ONNX Runtime on one batch from zero (or given) state: the test oracle."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = next(iter(inputs.values())).shape[0]
    feeds = dict(inputs)
    dtypes = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}
    for inp in sess.get_inputs():
        if inp.name.startswith("state_in_"):
            key = inp.name[len("state_in_") :]
            if states and key in states:
                feeds[inp.name] = states[key]
            else:
                feeds[inp.name] = np.zeros((batch, *inp.shape[1:]), dtypes[inp.type])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
