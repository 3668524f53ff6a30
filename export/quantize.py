"""Optional int8 dynamic quantization and its accuracy and speed report.

Uses ``onnxruntime.quantization.quantize_dynamic``.

Weights of MatMul, Gather and LSTM become int8 (LSTM -> ``com.microsoft.DynamicQuantizeLSTM``; GRU and RNN
stay float). Activations are quantized at run time with one scale per tensor per call, so an int8 model's
outputs depend slightly on what else is in the batch and on how a stream is chunked (measured below as
``batch_dependence_max_abs`` and ``streaming_max_abs``); the float32 export has neither effect.

The report compares the float32 and int8 models on the same random inputs (max/mean abs output difference,
and for token models top-1 agreement), optionally on real text (bits per character of the two models), and
measures throughput in steps/s for a streaming step (B=1, T=1) and a batched chunk (B=32, T=64).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from export.contract import check_contract, initial_states, random_data, read_contract, run


@dataclass(frozen=True)
class Throughput:
    """Steps per second (B * T * calls / seconds) for one call shape."""

    batch: int
    steps: int
    fp32_steps_per_s: float
    int8_steps_per_s: float

    @property
    def speedup(self) -> float:
        """int8 over float32."""
        return self.int8_steps_per_s / self.fp32_steps_per_s


@dataclass(frozen=True)
class QuantizationReport:
    """Accuracy and speed change of int8 dynamic quantization, written as ``quantization.json``."""

    output: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None  # token models: fraction of steps whose argmax token agrees
    fp32_bytes: int
    int8_bytes: int
    throughput: tuple[Throughput, ...]
    batch_dependence_max_abs: float  # int8: B=3 batch vs rows run alone
    streaming_max_abs: float  # int8: random chunks vs one pass
    eval_text_chars: int = 0
    fp32_bpc: float | None = None
    int8_bpc: float | None = None

    def to_json(self) -> str:
        """JSON with the speedups spelled out."""
        d = asdict(self)
        d["throughput"] = [{**asdict(t), "speedup": t.speedup} for t in self.throughput]
        return json.dumps(d, indent=2)

    def format(self) -> str:
        """Human-readable summary."""
        lines = [
            f"int8 vs float32 on {self.output}: max abs diff {self.max_abs_diff:.4g}, "
            f"mean abs diff {self.mean_abs_diff:.4g}"
        ]
        if self.top1_agreement is not None:
            lines.append(f"  top-1 agreement {100 * self.top1_agreement:.2f}%")
        if self.fp32_bpc is not None:
            lines.append(
                f"  bits/char on {self.eval_text_chars} chars: float32 {self.fp32_bpc:.4f}, "
                f"int8 {self.int8_bpc:.4f}"
            )
        lines.append(f"  size {self.fp32_bytes / 1e6:.2f} MB -> {self.int8_bytes / 1e6:.2f} MB")
        for t in self.throughput:
            lines.append(
                f"  B={t.batch} T={t.steps}: {t.fp32_steps_per_s:,.0f} -> {t.int8_steps_per_s:,.0f} steps/s "
                f"(x{t.speedup:.2f})"
            )
        lines.append(
            f"  int8 batch dependence {self.batch_dependence_max_abs:.3g}, "
            f"chunking dependence {self.streaming_max_abs:.3g} (float32: <= 1e-5)"
        )
        return "\n".join(lines)


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Quantize weights to int8 (dynamic); keep names, shapes and metadata; add rnnserve.quantization."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        q = onnx.load(str(dst))
    have = {p.key for p in q.metadata_props}
    for p in model.metadata_props:  # re-add anything the quantizer dropped
        if p.key not in have:
            entry = q.metadata_props.add()
            entry.key, entry.value = p.key, p.value
    entry = q.metadata_props.add()
    entry.key, entry.value = "rnnserve.quantization", "int8-dynamic"
    return q


def _session(blob: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the serving default is one thread per run; compare like with like
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def _steps_per_s(sess: ort.InferenceSession, spec, batch: int, steps: int, seconds: float) -> float:
    rng = np.random.default_rng(1)
    data = random_data(spec, batch, steps, rng)
    state = initial_states(spec, batch)
    run(sess, spec, data, state)  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, state = run(sess, spec, data, state)
        calls += 1
    return batch * steps * calls / (time.perf_counter() - start)


def bits_per_char(sess: ort.InferenceSession, spec, text: str, chunk: int = 256) -> tuple[float, int]:
    """Bits per character of a token model on ``text`` (characters outside the vocabulary are skipped)."""
    vocab = spec.vocabulary or []
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.array([index[c] for c in text if c in index], np.int64)
    state = initial_states(spec, 1)
    nll, count = 0.0, 0
    name_in, name_out = spec.data_inputs[0].name, spec.data_outputs[0].name
    for lo in range(0, len(ids) - 1, chunk):
        x = ids[lo : min(lo + chunk, len(ids) - 1)]
        out, state = run(sess, spec, {name_in: x[None]}, state)
        logits = out[name_out][0].astype(np.float64)  # (T, V)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        target = ids[lo + 1 : lo + 1 + len(x)]
        nll += float(np.sum(logz - logits[np.arange(len(x)), target]))
        count += len(x)
    return nll / max(count, 1) / math.log(2), count


def compare(
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    *,
    eval_text: str | None = None,
    seconds: float = 1.0,
    seed: int = 0,
    plot_path: Path | None = None,
) -> QuantizationReport:
    """Measure the accuracy and speed change of ``int8`` against ``fp32`` (and plot it to ``plot_path``)."""
    spec = read_contract(fp32)
    s32, s8 = _session(fp32.SerializeToString()), _session(int8.SerializeToString())
    rng = np.random.default_rng(seed)
    steps = 64 if spec.time_axis else 1
    data = random_data(spec, 8, steps, rng)
    out_name = spec.data_outputs[0].name
    y32 = run(s32, spec, data, initial_states(spec, 8))[0][out_name]
    y8 = run(s8, spec, data, initial_states(spec, 8))[0][out_name]
    diff = np.abs(y32.astype(np.float64) - y8)
    top1 = None
    if spec.vocabulary is not None:
        top1 = float(np.mean(y32.argmax(-1) == y8.argmax(-1)))
    shapes = [(1, 1), (32, steps)]
    throughput = []
    for b, t in tqdm(shapes, desc="timing float32 vs int8", leave=False):
        throughput.append(
            Throughput(b, t, _steps_per_s(s32, spec, b, t, seconds), _steps_per_s(s8, spec, b, t, seconds))
        )
    self_check = check_contract(int8, tol=float("inf"), seed=seed)  # measure, do not judge
    dep = {c.name.split(" (")[0]: c.max_abs or 0.0 for c in self_check.checks}
    bpc32 = bpc8 = None
    chars = 0
    if eval_text is not None and spec.vocabulary is not None:
        bpc32, chars = bits_per_char(s32, spec, eval_text)
        bpc8, _ = bits_per_char(s8, spec, eval_text)
    report = QuantizationReport(
        output=out_name,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=top1,
        fp32_bytes=fp32.ByteSize(),
        int8_bytes=int8.ByteSize(),
        throughput=tuple(throughput),
        batch_dependence_max_abs=float(dep.get("batch rows independent", 0.0)),
        streaming_max_abs=float(dep.get("streaming invariance", 0.0)),
        eval_text_chars=chars,
        fp32_bpc=bpc32,
        int8_bpc=bpc8,
    )
    if plot_path is not None:
        name = fp32.graph.name.removeprefix("rnnserve_")
        plot(report, diff, plot_path, f"int8 dynamic quantization: {name}")
    return report


def plot(report: QuantizationReport, diffs: np.ndarray | None, path: Path, title: str) -> None:
    """Write a PNG: throughput float32 vs int8 per call shape, and the distribution of output differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"B={t.batch} T={t.steps}" for t in report.throughput]
    xs = np.arange(len(labels))
    ax1.bar(xs - 0.2, [t.fp32_steps_per_s for t in report.throughput], 0.4, label="float32")
    ax1.bar(xs + 0.2, [t.int8_steps_per_s for t in report.throughput], 0.4, label="int8")
    ax1.set_xticks(xs, labels)
    ax1.set_ylabel("steps/s (1 ORT thread)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("throughput")
    if diffs is not None and diffs.size:
        ax2.hist(np.log10(np.maximum(diffs.ravel(), 1e-12)), bins=50)
    ax2.set_xlabel(f"log10 |int8 - float32| of {report.output}")
    ax2.set_ylabel("count")
    ax2.set_title(f"max {report.max_abs_diff:.3g}, mean {report.mean_abs_diff:.3g}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
