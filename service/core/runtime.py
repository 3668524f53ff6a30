"""ONNX Runtime wrapper: one `InferenceSession` per model version.

`Runtime.run` blocks; callers run it off the event loop in the engine's dedicated executor
(`loop.run_in_executor(engine.executor, ...)`), never on the loop itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

# ONNX Runtime's type strings -> numpy dtypes (every dtype a state or data tensor may use).
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


class Runtime:
    """One loaded ONNX model: sequential execution, a fixed number of intra-op threads, CPU provider."""

    __slots__ = ("path", "session", "input_names", "output_names", "metadata", "_threads", "_burst")

    def __init__(self, path: Path, intra_op_threads: int = 1, *, arena: bool = True) -> None:
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._threads = intra_op_threads
        self._burst: Runtime | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a full batch (blocking). Returns every output by name."""
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs, strict=True))

    def for_bursts(self) -> Runtime:
        """Return a second session of this model without the CPU memory arena (built on first use, blocking).

        Requests much larger than the usual step run there: their working memory goes back to the allocator
        when they end, instead of growing the arena the per-step batches keep for the process's life.
        """
        if self._burst is None:
            self._burst = Runtime(self.path, self._threads, arena=False)
        return self._burst
