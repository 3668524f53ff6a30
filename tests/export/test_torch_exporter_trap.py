"""Why export/graph.py builds the graph itself: torch.onnx.export fixes the time axis of our models.

These tests pin the behaviour of torch 2.13 that the design works around (export/graph.py docstring). If a
future torch exports a dynamic T, they fail, and the design choice deserves a second look.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import ModelConfig, build_model


class _Flat(torch.nn.Module):
    """Tensor-in, tensor-out wrapper (the exporters want positional tensors, not a state dict)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, h, c):
        y, st = self.model(x, {"h": h, "c": c})
        return y, st["h"], st["c"]


def _feeds(steps: int) -> dict[str, np.ndarray]:
    return {
        "x": np.random.default_rng(0).standard_normal((1, steps, 2)).astype(np.float32),
        "h": np.zeros((1, 1, 8), np.float32),
        "c": np.zeros((1, 1, 8), np.float32),
    }


@pytest.fixture(scope="module")
def flat():
    torch.manual_seed(0)
    return _Flat(build_model(ModelConfig("lstm", "numeric", in_features=2, out_features=1, hidden=8)).eval())


def _example():
    return (torch.randn(1, 5, 2), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))


def test_tracer_unrolls_to_the_example_length(flat, tmp_path):
    path = tmp_path / "traced.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat,
            _example(),
            str(path),
            input_names=["x", "h", "c"],
            output_names=["y", "ho", "co"],
            dynamo=False,
            dynamic_axes={"x": {0: "batch", 1: "time"}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", "time", 2]  # declared dynamic ...
    y = sess.run(["y"], _feeds(7))[0]
    assert y.shape == (1, 5, 1)  # ... but 7 steps in give 5 steps out: silently wrong


@pytest.mark.slow
def test_dynamo_exporter_fixes_the_time_axis(flat, tmp_path):
    path = tmp_path / "dynamo.onnx"
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat,
            _example(),
            str(path),
            input_names=["x", "h", "c"],
            output_names=["y", "ho", "co"],
            dynamo=True,
            dynamic_shapes=({0: batch, 1: time}, {0: batch}, {0: batch}),
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1] == 5  # asked for a dynamic 'time', got the example's 5
    with pytest.raises(Exception, match="Expected: 5"):
        sess.run(["y"], _feeds(7))
