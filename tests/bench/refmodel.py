"""The benchmark's reference model: a 2-layer LSTM, hidden size 256, built with ``onnx.helper``.

It follows the state contract of docs/DESIGN.md section 1 exactly as our exporter would write it: data input
``x`` float32 ``(B, T, F)``, data output ``y`` float32 ``(B, T, F)``, state pairs
``state_in_h``/``state_out_h`` and ``state_in_c``/``state_out_c`` of shape ``(B, 2, 256)``; the batch dim is
named ``batch`` and the time dim ``time``. Each layer is the fused ONNX ``LSTM`` op (time-major, so the graph
transposes at the edges), which is what ONNX Runtime runs fastest and what ``export/`` emits for LSTM kinds.
Building it here keeps the benchmark independent of a trained checkpoint and of torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True, slots=True)
class RefModelConfig:
    """Shape of the reference LSTM."""

    features: int = 32
    hidden: int = 256
    layers: int = 2
    seed: int = 0

    @property
    def state_bytes(self) -> int:
        """Raw bytes of one session's state (h and c, float32)."""
        return 2 * self.layers * self.hidden * 4


def build_reference_lstm(cfg: RefModelConfig = RefModelConfig()) -> onnx.ModelProto:
    """Return the reference LSTM as an ONNX model (opset 17), weights drawn from a seeded normal."""
    rng = np.random.default_rng(cfg.seed)
    H, F, L = cfg.hidden, cfg.features, cfg.layers
    scale = 1.0 / np.sqrt(H)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    # x (B, T, F) -> (T, B, F): the ONNX LSTM op is time-major.
    nodes.append(helper.make_node("Transpose", ["x"], ["x_tbf"], perm=[1, 0, 2]))
    # states (B, L, H) -> (L, B, H) so that layer l's slice is (1, B, H), the op's initial_h layout.
    nodes.append(helper.make_node("Transpose", ["state_in_h"], ["h_lbh"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Transpose", ["state_in_c"], ["c_lbh"], perm=[1, 0, 2]))
    split = const("split_ones", np.ones(L, dtype=np.int64))
    nodes.append(helper.make_node("Split", ["h_lbh", split], [f"h0_{i}" for i in range(L)], axis=0))
    nodes.append(helper.make_node("Split", ["c_lbh", split], [f"c0_{i}" for i in range(L)], axis=0))
    axes0 = const("axes_1", np.array([1], dtype=np.int64))
    layer_in, in_size = "x_tbf", F
    for i in range(L):
        w = const(f"W{i}", (rng.standard_normal((1, 4 * H, in_size)) * scale).astype(np.float32))
        r = const(f"R{i}", (rng.standard_normal((1, 4 * H, H)) * scale).astype(np.float32))
        b = const(f"B{i}", (rng.standard_normal((1, 8 * H)) * scale).astype(np.float32))
        nodes.append(
            helper.make_node(
                "LSTM",
                [layer_in, w, r, b, "", f"h0_{i}", f"c0_{i}"],
                [f"y4_{i}", f"hT_{i}", f"cT_{i}"],
                hidden_size=H,
            )
        )
        # Y is (T, num_directions=1, B, H); drop the direction axis for the next layer.
        nodes.append(helper.make_node("Squeeze", [f"y4_{i}", axes0], [f"y_{i}"]))
        layer_in, in_size = f"y_{i}", H
    nodes.append(helper.make_node("Concat", [f"hT_{i}" for i in range(L)], ["h_out_lbh"], axis=0))
    nodes.append(helper.make_node("Concat", [f"cT_{i}" for i in range(L)], ["c_out_lbh"], axis=0))
    nodes.append(helper.make_node("Transpose", ["h_out_lbh"], ["state_out_h"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Transpose", ["c_out_lbh"], ["state_out_c"], perm=[1, 0, 2]))
    # Output head: (T, B, H) -> (B, T, H) @ (H, F) + b -> (B, T, F).
    nodes.append(helper.make_node("Transpose", [layer_in], ["top_bth"], perm=[1, 0, 2]))
    wo = const("W_out", (rng.standard_normal((H, F)) * scale).astype(np.float32))
    bo = const("b_out", np.zeros(F, dtype=np.float32))
    nodes.append(helper.make_node("MatMul", ["top_bth", wo], ["y_nobias"]))
    nodes.append(helper.make_node("Add", ["y_nobias", bo], ["y"]))

    def vi(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes,
        "ref_lstm",
        inputs=[
            vi("x", ["batch", "time", F]),
            vi("state_in_h", ["batch", L, H]),
            vi("state_in_c", ["batch", L, H]),
        ],
        outputs=[
            vi("y", ["batch", "time", F]),
            vi("state_out_h", ["batch", L, H]),
            vi("state_out_c", ["batch", L, H]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rnnserve-bench"
    )
    model.ir_version = 8
    for key, value in {
        "rnnserve.family": "lstm",
        "rnnserve.task": "numeric",
        "rnnserve.description": f"benchmark reference: {L}-layer LSTM, H={H}, F={F}, random weights",
        "rnnserve.data": "none (random weights; benchmark only)",
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def write_reference_repository(
    root: Path, cfg: RefModelConfig = RefModelConfig(), *, name: str = "ref_lstm", config_yaml: str = ""
) -> Path:
    """Write ``<root>/<name>/1/model.onnx`` (+ optional config.yaml) and return the model file path."""
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_reference_lstm(cfg), str(path))
    if config_yaml:
        (root / name / "config.yaml").write_text(config_yaml)
    return path
