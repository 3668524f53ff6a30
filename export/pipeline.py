"""Checkpoint -> verified ONNX in the model repository: ``<repository>/<name>/<version>/model.onnx``.

Steps: load the checkpoint; build the graph (``export.graph``); verify it (``export.verify``: contract
checks and ORT == PyTorch); optionally quantize to int8 and measure the change (``export.quantize``); then
write the version directory atomically (built under a temporary name, then renamed, so a server watching
the repository never sees a half-written version). A failed verification raises :class:`ExportError` and
writes nothing.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import yaml

from export.contract import Report, check_contract, versions
from export.graph import build_onnx, file_sha256
from export.quantize import QuantizationReport, compare, quantize_int8
from export.verify import verify_against_torch
from models import read_checkpoint
from service.config import Settings

CONFIG_TEMPLATE = """\
# Serving settings for model {name!r} (docs/DESIGN.md section 1). Written once by the exporter; edit freely,
# later exports never overwrite it. Unset keys take the server's defaults; the description defaults to the
# model's rnnserve.description metadata, which each export refreshes (so it is left unset here).
# description:
# max_batch_size:
# max_queue_delay_ms:
# max_sessions:
# idle_ttl_s:
# max_chunk_steps:
# allow_non_finite:
"""


def int8_self_check_tolerance(proto: onnx.ModelProto) -> float:
    """Return the self-check tolerance an int8 model needs: its measured batch/chunk dependence x 4."""
    import onnxruntime as ort

    from service.core.contract import read_session
    from service.core.controls import control_feeds
    from service.core.selfcheck import probe_of_spec, self_check
    from service.core.types import SELF_CHECK_TOLERANCE, ModelConfig

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = read_session(sess, "int8", 1, ModelConfig.from_settings(Settings(), None), Path("model.onnx"))
    verdict = self_check(sess, probe_of_spec(spec, control_feeds(spec)), tol=float("inf"))
    needed = max(4 * verdict.max_abs, SELF_CHECK_TOLERANCE)
    step = 10 ** (math.floor(math.log10(needed)) - 1)  # rounded up to two significant digits
    return float(f"{math.ceil(needed / step) * step:.2g}")


def _configured_tolerance(model_dir: Path) -> float | None:
    """Return the self_check_tolerance a model's existing config.yaml sets, if any."""
    cfg = model_dir / "config.yaml"
    if not cfg.exists():
        return None
    values = yaml.safe_load(cfg.read_text()) or {}
    tol = values.get("self_check_tolerance") if isinstance(values, dict) else None
    return float(tol) if tol is not None else None


class ExportError(RuntimeError):
    """Verification failed; ``report`` says which checks."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(f"{message}\n{report.format()}")
        self.report = report


@dataclass(frozen=True)
class ExportResult:
    """What an export did: where it wrote (or would have), the verification report, the int8 report if any."""

    name: str
    version: int
    path: Path
    report: Report
    skipped: bool = False
    quantization: QuantizationReport | None = None


def _metadata(path: Path) -> dict[str, str]:
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _same_source(model_dir: Path, version: int, sha: str, quantize: str | None) -> bool:
    """Tell whether ``version`` came from the checkpoint with hash ``sha``, with the same quantization."""
    path = model_dir / str(version) / "model.onnx"
    meta = _metadata(path) if path.exists() else {}
    same_quant = ("rnnserve.quantization" in meta) == (quantize is not None)
    return meta.get("rnnserve.checkpoint_sha256") == sha and same_quant


def write_version(
    proto: onnx.ModelProto,
    report: Report,
    model_dir: Path,
    version: int,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write ``model_dir/<version>/`` (model.onnx, verification.txt, ``extra`` files) atomically.

    The directory is built under a temporary name and renamed into place, so a server watching the
    repository sees the version complete or not at all. A new model directory gets a commented
    ``config.yaml``; an existing one is never overwritten. Returns the path of ``model.onnx``.
    """
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(
            f"{target} already exists; pick another --version or omit it for the next free one"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=model_dir))
    try:
        onnx.save(proto, str(tmp / "model.onnx"))
        for fname, blob in (extra or {}).items():
            (tmp / fname).write_bytes(blob)
        (tmp / "verification.txt").write_text(report.format() + "\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)  # atomic: the version appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config = model_dir / "config.yaml"
    if not config.exists():
        config.write_text(CONFIG_TEMPLATE.format(name=model_dir.name))
    return target / "model.onnx"


def export_checkpoint(
    checkpoint: str | Path,
    repository: str | Path,
    name: str,
    *,
    version: int | None = None,
    quantize: str | None = None,
    if_changed: bool = False,
    eval_text: str | None = None,
    tol: float = 1e-5,
    progress: bool = True,
    timing_seconds: float = 1.0,
) -> ExportResult:
    """Export one checkpoint into the repository; see the module docstring.

    ``timing_seconds``: how long each int8/float32 throughput measurement runs.
    ``if_changed``: skip when the newest version was exported from a checkpoint with the same SHA-256 (and
    the same quantization), so ``make export`` is idempotent.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    checkpoint, model_dir = Path(checkpoint), Path(repository) / name
    sha = file_sha256(checkpoint)
    existing = versions(model_dir)
    if if_changed and existing and version is None and _same_source(model_dir, existing[-1], sha, quantize):
        return ExportResult(name, existing[-1], model_dir / str(existing[-1]) / "model.onnx", Report(), True)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(
            f"{target} already exists; pick another --version or omit it for the next free one"
        )

    ck = read_checkpoint(checkpoint)
    proto = build_onnx(ck.model, ck.meta, sha)
    report = check_contract(proto, tol)
    report.extend(verify_against_torch(proto, ck.model, tol=tol, progress=progress))
    if not report.ok:
        raise ExportError(f"verification of {checkpoint} failed; nothing written", report)
    qreport = None
    if quantize == "int8":
        qproto = quantize_int8(proto)
        # Structure, loading and dynamic T must hold; batch/chunk dependence is inherent to dynamic activation
        # scales, so it is measured in the report instead of judged against a made-up bound. The server's
        # load-time self-check would refuse it at its default tolerance: the model's config.yaml carries the
        # tolerance measured here (x4), and the served check below uses it, as the server will.
        int8_tolerance = int8_self_check_tolerance(qproto)
        existing = _configured_tolerance(model_dir)
        if existing is not None and existing < int8_tolerance:
            raise ExportError(
                f"int8 model of {checkpoint}: {model_dir / 'config.yaml'} sets self_check_tolerance "
                f"{existing:g}; "
                f"the int8 model needs {int8_tolerance:g} (dynamic quantization scales depend on the batch); "
                "nothing written",
                Report(),
            )
        qcheck = check_contract(
            qproto, tol=float("inf"), config={"self_check_tolerance": existing or int8_tolerance}
        )
        if not qcheck.ok:
            raise ExportError(f"int8 model of {checkpoint} breaks the contract; nothing written", qcheck)
        plot_dir = Path(tempfile.mkdtemp(prefix="rnnserve-quant-"))
        qreport = compare(
            proto,
            qproto,
            eval_text=eval_text,
            seconds=timing_seconds,
            plot_path=plot_dir / "quantization.png",
        )
        proto = qproto

    extra: dict[str, bytes] = {}
    if qreport is not None:
        extra["quantization.json"] = (qreport.to_json() + "\n").encode()
        extra["quantization.png"] = (plot_dir / "quantization.png").read_bytes()
        shutil.rmtree(plot_dir, ignore_errors=True)
    if qreport is not None and not (model_dir / "config.yaml").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.yaml").write_text(
            CONFIG_TEMPLATE.format(name=model_dir.name)
            + "# int8: batch and chunk dependence measured at export, x4 (the load-time self-check's bound)\n"
            f"self_check_tolerance: {int8_tolerance:g}\n"
        )
    write_version(proto, report, model_dir, version, extra)
    return ExportResult(name, version, target / "model.onnx", report, quantization=qreport)
