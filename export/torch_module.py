r"""Export a user's own PyTorch module (nn.RNN / LSTM / GRU with simple layers around them) to verified ONNX.

    from export.torch_module import export_module
    export_module(model, "my_repository", "my_model", vocabulary=vocab)     # my_repository/my_model/1/

    python -m export.torch_module my_model.py:build --repository my_repository --name my_model \\
        [--state-dict weights.pt] [--vocabulary vocab.json] [--layers embed,rnn,head]

**What is supported.** The module is read as a chain of layers, each applied to every time step, with one
or more recurrent layers in it. The chain is the module's leaf layers in the order they were registered
(the order ``print(model)`` shows; ``nn.Sequential``/``nn.ModuleList`` and your own container modules are
walked through), or the dotted attribute paths you list in ``layers=``. Supported layers:

- recurrent: ``nn.RNN`` (tanh or relu), ``nn.LSTM``, ``nn.GRU``; any ``num_layers``, with or without bias,
  ``batch_first`` either way (all recurrent layers of one model the same way);
- first layer only: ``nn.Embedding`` (the model then takes token ids; without it, float features);
- per step: ``nn.Linear``, ``nn.LayerNorm`` (over the last dim), ``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``,
  ``nn.GELU`` (exact), ``nn.SiLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.Softmax``/``nn.LogSoftmax`` (last dim),
  ``nn.Dropout`` and ``nn.Identity`` (no-ops in eval mode).

Refused, with a message saying why: bidirectional layers (the backward direction reads the future, so the
model cannot stream), ``proj_size`` (no ONNX op), ``nn.Embedding`` with ``max_norm`` or not first, dropout
in train mode (call ``model.eval()``), any other layer type, recurrent layers with different
``batch_first``, and a chain without a recurrent layer.

**What is written.** ``tokens`` int64 ``(B, T)`` -> ``logits`` ``(B, T, V)`` (with an embedding) or ``x``
float32 ``(B, T, F)`` -> ``y`` ``(B, T, F_out)``; batch and time axes dynamic; per recurrent layer the
contract's state pairs ``state_in_h``/``state_out_h`` ``(B, num_layers, H)`` (and ``c`` for an LSTM),
prefixed with the layer's path (``rnn1_h``) when there are several. The graph is written with
``onnx.helper`` and the fused ONNX recurrent ops (``export.graph``), because ``torch.onnx.export`` fixes
the time axis (docs/state-contract.md).

**Verification** (before anything is written; a failure raises ``ExportError``): the torch-free contract
checks (``export.contract``); ONNX Runtime == PyTorch at T in {1, 7, 64} x B in {1, 5, 64} from random states
and a stream cut into random chunks == PyTorch's one pass (``export.verify``); and your module's own
``forward(x)`` (or ``forward(x, None)``) equals the chain of layers from a zero state, which is what shows
that the chain read from your module is the computation your forward does. A forward that returns only the
last step (``out[:, -1]``) fails that check: serve the per-step model and take the last output.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from export.contract import CheckResult, Report, check_contract
from export.graph import (
    BATCH,
    OPSET,
    PRODUCER,
    TIME,
    FusedLayer,
    _Graph,
    _np,
    fused_stack,
    gru_onnx_weights,
    lstm_onnx_weights,
)
from export.pipeline import ExportError, versions, write_version
from export.verify import verify_against_torch
from models import StateShape

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU)
NO_OPS = (nn.Dropout, nn.Identity)
PER_STEP = (nn.Linear, nn.LayerNorm, nn.Softmax, nn.LogSoftmax, *ACTIVATIONS, *NO_OPS)
SUPPORTED = "nn.RNN, nn.LSTM, nn.GRU, nn.Embedding (first), " + ", ".join(
    f"nn.{t.__name__}" for t in PER_STEP
)


class UnsupportedModule(ValueError):
    """The module cannot be exported as a streaming model; the message says which layer and why."""


@dataclass(frozen=True)
class PipelineConfig:
    """What the verifier reads off a model: task and input/output sizes (as ``models.ModelConfig`` has)."""

    task: str  # "token" | "numeric"
    vocab_size: int = 0
    in_features: int = 0
    out_features: int = 0
    batch_first: bool = True  # the layout the user's own forward takes


def _check_recurrent(path: str, m: nn.Module) -> None:
    if m.bidirectional:
        raise UnsupportedModule(
            f"{path}: bidirectional {type(m).__name__} cannot stream (its backward direction reads future "
            "steps); use bidirectional=False"
        )
    if isinstance(m, nn.LSTM) and m.proj_size:
        raise UnsupportedModule(f"{path}: LSTM with proj_size={m.proj_size} is not supported (no ONNX op)")
    if m.training and m.dropout > 0 and m.num_layers > 1:
        raise UnsupportedModule(
            f"{path}: dropout={m.dropout} between layers is active in train mode; call model.eval() first"
        )


def _leaf_problem(m: nn.Module) -> str | None:
    """Why a per-step or embedding layer cannot be exported as configured, or None."""
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        return "nn.Embedding with max_norm rewrites its weights; not supported"
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        return f"dropout p={m.p} is active in train mode; call model.eval() first"
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
        return "LayerNorm over more than the last dim is not supported"
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim not in (-1, 2):
        return f"{type(m).__name__}(dim={m.dim}): only the last dim (-1)"
    if isinstance(m, nn.GELU) and m.approximate != "none":
        return f"GELU(approximate={m.approximate!r}): only the exact form"
    if not isinstance(m, (*PER_STEP, nn.Embedding)):
        return (
            f"layer type {type(m).__name__} is not supported; supported: {SUPPORTED} "
            "(or list the layers to export with layers=[...])"
        )
    return None


def _check_leaf(i: int, path: str, m: nn.Module) -> None:
    if isinstance(m, RECURRENT):
        _check_recurrent(path, m)
        return
    if isinstance(m, nn.Embedding) and i != 0:
        raise UnsupportedModule(f"{path}: nn.Embedding must be the first layer (it takes the token ids)")
    problem = _leaf_problem(m)
    if problem:
        raise UnsupportedModule(f"{path}: {problem}")


def discover(module: nn.Module, layers: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Return the chain of ``(path, layer)`` to export, checked (see the module docstring).

    ``layers``: dotted attribute paths in order; default the module's leaf layers in registration order.
    Raises :class:`UnsupportedModule`.
    """
    if layers is not None:
        chain = []
        for path in layers:
            try:
                chain.append((path, module.get_submodule(path)))
            except AttributeError:
                raise UnsupportedModule(
                    f"layers: {type(module).__name__} has no submodule {path!r}"
                ) from None
    elif isinstance(module, (*RECURRENT, *PER_STEP, nn.Embedding)):
        chain = [(type(module).__name__.lower(), module)]
    else:
        chain = [(p, m) for p, m in module.named_modules() if p and not list(m.children())]
    if not chain:
        raise UnsupportedModule(f"{type(module).__name__} has no layers")
    for i, (path, m) in enumerate(chain):
        _check_leaf(i, path, m)
    recurrent = [(p, m) for p, m in chain if isinstance(m, RECURRENT)]
    if not recurrent:
        raise UnsupportedModule(f"no nn.RNN, nn.LSTM or nn.GRU among the layers {[p for p, _ in chain]}")
    if len({m.batch_first for _, m in recurrent}) > 1:
        raise UnsupportedModule(
            "recurrent layers disagree on batch_first "
            f"({', '.join(f'{p}={m.batch_first}' for p, m in recurrent)}); use one layout"
        )
    _check_widths(chain)
    return chain


def _check_widths(chain: Sequence[tuple[str, nn.Module]]) -> int | None:
    """Check each layer takes the previous layer's output width; return the chain's output width.

    A clear error here instead of a shape crash in the graph. None: no layer fixes the width.
    """
    width, prev = None, "the input"
    for path, m in chain:
        want = None
        if isinstance(m, nn.Linear):
            want, out = m.in_features, m.out_features
        elif isinstance(m, RECURRENT):
            want, out = m.input_size, m.hidden_size
        elif isinstance(m, nn.LayerNorm):
            want, out = m.normalized_shape[0], m.normalized_shape[0]
        elif isinstance(m, nn.Embedding):
            out = m.embedding_dim
        else:
            out = width
        if want is not None and width is not None and want != width:
            raise UnsupportedModule(f"{path} expects {want} features but {prev} gives {width}")
        width, prev = out, path
    return width


def _state_prefix(path: str, many: bool) -> str:
    return path.replace(".", "_") + "_" if many else ""


def _input_width(steps: Sequence[nn.Module]) -> int:
    """Feature width of a numeric chain's input: that of the first layer which declares one."""
    for m in steps:
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, RECURRENT):
            return m.input_size
        if isinstance(m, nn.LayerNorm):
            return m.normalized_shape[0]
    raise UnsupportedModule("no layer declares the input width")  # pragma: no cover - a recurrent layer does


class ModulePipeline(nn.Module):
    """The user's layers as one stateful model: ``forward(x, state) -> (y, state)``, batch first.

    ``state`` follows the contract: ``h`` (B, num_layers, H) per recurrent layer (``c`` too for an LSTM),
    prefixed with the layer's path when there are several. This is the PyTorch side of the verification.
    """

    def __init__(self, chain: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.paths = [p for p, _ in chain]
        self.steps = nn.ModuleList([m for _, m in chain])
        rec = [m for m in self.steps if isinstance(m, RECURRENT)]
        many = len(rec) > 1
        self.prefixes = {p: _state_prefix(p, many) for p, m in chain if isinstance(m, RECURRENT)}
        first = self.steps[0]
        out = _check_widths(chain) or rec[-1].hidden_size
        if isinstance(first, nn.Embedding):
            self.cfg = PipelineConfig(
                "token", vocab_size=first.num_embeddings, out_features=out, batch_first=rec[0].batch_first
            )
        else:
            self.cfg = PipelineConfig(
                "numeric",
                in_features=_input_width(self.steps),
                out_features=out,
                batch_first=rec[0].batch_first,
            )

    def state_shapes(self) -> list[StateShape]:
        """Return the carried state tensors in graph order, shapes without the batch axis."""
        out = []
        for path, m in zip(self.paths, self.steps, strict=True):
            if isinstance(m, RECURRENT):
                pre = self.prefixes[path]
                out.append(StateShape(f"{pre}h", (m.num_layers, m.hidden_size), torch.float32))
                if isinstance(m, nn.LSTM):
                    out.append(StateShape(f"{pre}c", (m.num_layers, m.hidden_size), torch.float32))
        return out

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """x: tokens (B, T) int64 or features (B, T, F) -> (outputs (B, T, O), new state)."""
        B = x.shape[0]
        if state is None:
            state = {s.name: torch.zeros((B, *s.shape), dtype=s.dtype) for s in self.state_shapes()}
        new: dict[str, Tensor] = {}
        for path, m in zip(self.paths, self.steps, strict=True):
            if not isinstance(m, RECURRENT):
                x = m(x)
                continue
            pre = self.prefixes[path]
            h0 = state[f"{pre}h"].transpose(0, 1).contiguous()  # (L, B, H)
            hx = (h0, state[f"{pre}c"].transpose(0, 1).contiguous()) if isinstance(m, nn.LSTM) else h0
            seq = x if m.batch_first else x.transpose(0, 1)  # the layer's own layout
            y, hn = m(seq, hx)
            x = y if m.batch_first else y.transpose(0, 1)  # (B, T, H)
            if isinstance(m, nn.LSTM):
                new[f"{pre}h"], new[f"{pre}c"] = hn[0].transpose(0, 1), hn[1].transpose(0, 1)  # (B, L, H)
            else:
                new[f"{pre}h"] = hn.transpose(0, 1)  # (B, L, H)
        return x, new


def _fused_layers(m: nn.Module) -> list[FusedLayer]:
    """One :class:`FusedLayer` per layer of an nn.RNN / nn.LSTM / nn.GRU."""
    out = []
    for k in range(m.num_layers):
        w_ih, w_hh = _np(getattr(m, f"weight_ih_l{k}")), _np(getattr(m, f"weight_hh_l{k}"))
        if m.bias:
            b_ih, b_hh = _np(getattr(m, f"bias_ih_l{k}")), _np(getattr(m, f"bias_hh_l{k}"))
        else:
            b_ih = b_hh = np.zeros(w_ih.shape[0], np.float32)
        if isinstance(m, nn.LSTM):
            W, R, B, _ = lstm_onnx_weights(w_ih, w_hh, b_ih, b_hh)
            out.append(FusedLayer("LSTM", W, R, B))
        elif isinstance(m, nn.GRU):
            W, R, B = gru_onnx_weights(w_ih, w_hh, b_ih, b_hh)
            out.append(FusedLayer("GRU", W, R, B, attrs=(("linear_before_reset", 1),)))
        else:
            act = "Relu" if m.nonlinearity == "relu" else "Tanh"
            B = np.concatenate([b_ih, b_hh])[None]  # (1, 2H)
            out.append(FusedLayer("RNN", w_ih[None], w_hh[None], B, attrs=(("activations", [act]),)))
    return out


_ELEMENTWISE = (
    (nn.ReLU, "Relu"),
    (nn.Tanh, "Tanh"),
    (nn.Sigmoid, "Sigmoid"),
    (nn.LeakyReLU, "LeakyRelu"),
    (nn.ELU, "Elu"),
    (nn.Softmax, "Softmax"),
    (nn.LogSoftmax, "LogSoftmax"),
)


def _attrs(m: nn.Module) -> dict[str, float | int]:
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return {"axis": -1}
    if isinstance(m, nn.LeakyReLU):
        return {"alpha": float(m.negative_slope)}
    if isinstance(m, nn.ELU):
        return {"alpha": float(m.alpha)}
    return {}


def _per_step(g: _Graph, m: nn.Module, x: str, tag: str) -> str:
    """Emit one per-step layer on ``x`` (B, T, F); return its output name."""
    if isinstance(m, nn.Linear):
        y = g.op1("MatMul", [x, g.const(f"{tag}_W", _np(m.weight).T)], f"{tag}_mm")  # (B, T, O)
        return y if m.bias is None else g.op1("Add", [y, g.const(f"{tag}_b", _np(m.bias))], tag)
    if isinstance(m, nn.LayerNorm):
        n = m.normalized_shape[0]
        scale = _np(m.weight) if m.weight is not None else np.ones(n, np.float32)
        bias = _np(m.bias) if m.bias is not None else np.zeros(n, np.float32)
        ins = [x, g.const(f"{tag}_scale", scale), g.const(f"{tag}_bias", bias)]
        return g.op1("LayerNormalization", ins, tag, axis=-1, epsilon=float(m.eps))
    for kind, op in _ELEMENTWISE:
        if isinstance(m, kind):
            return g.op1(op, [x], tag, **_attrs(m))
    if isinstance(m, nn.SiLU):
        return g.op1("Mul", [x, g.op1("Sigmoid", [x], f"{tag}_sig")], tag)
    if isinstance(m, nn.GELU):  # 0.5 x (1 + erf(x / sqrt 2)); ONNX has Gelu only from opset 20
        e = g.op1("Erf", [g.op1("Mul", [x, g.const("inv_sqrt2", np.array(2**-0.5, np.float32))])])
        one_plus = g.op1("Add", [e, g.const("one", np.array(1.0, np.float32))])
        return g.op1("Mul", [g.op1("Mul", [x, one_plus]), g.const("half", np.array(0.5, np.float32))], tag)
    if isinstance(m, NO_OPS):
        return x
    raise UnsupportedModule(f"{tag}: {type(m).__name__} is not supported")  # pragma: no cover - discover()


@dataclass
class ModuleMeta:
    """Descriptive metadata for ``metadata_props`` (docs/state-contract.md)."""

    vocabulary: list[str] | None = None  # token models: index = token id (optional)
    description: str = ""
    data: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _layer_summary(path: str, m: nn.Module) -> dict[str, object]:
    d: dict[str, object] = {"path": path, "type": type(m).__name__}
    if isinstance(m, RECURRENT):
        d.update(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers)
    elif isinstance(m, nn.Linear):
        d.update(in_features=m.in_features, out_features=m.out_features)
    elif isinstance(m, nn.Embedding):
        d.update(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim)
    return d


def metadata(pipe: ModulePipeline, meta: ModuleMeta, source: str) -> dict[str, str]:
    """Return the ``rnnserve.*`` metadata_props for an exported user module."""
    kinds = [type(m).__name__.lower() for m in pipe.steps if isinstance(m, RECURRENT)]
    family = "+".join(dict.fromkeys(kinds))
    chain = [_layer_summary(p, m) for p, m in zip(pipe.paths, pipe.steps, strict=True)]
    shape = " -> ".join(
        f"{s['path']} ({s['num_layers']}x{s['hidden_size']})" if "hidden_size" in s else str(s["path"])
        for s in chain
    )
    props = {
        "rnnserve.family": family,
        "rnnserve.task": pipe.cfg.task,
        "rnnserve.data": meta.data,
        "rnnserve.metrics": json.dumps(meta.metrics, sort_keys=True),
        "rnnserve.description": meta.description or f"{family} {pipe.cfg.task} model {source}: {shape}",
        "rnnserve.layers": json.dumps(chain),
        "rnnserve.source": source,
    }
    if meta.vocabulary is not None:
        if pipe.cfg.task != "token":
            raise UnsupportedModule(
                "a vocabulary was given but the model has no nn.Embedding (numeric input)"
            )
        if len(meta.vocabulary) != pipe.cfg.vocab_size:
            raise UnsupportedModule(
                f"vocabulary has {len(meta.vocabulary)} entries but the embedding has {pipe.cfg.vocab_size}"
            )
        props["rnnserve.vocabulary"] = json.dumps(list(meta.vocabulary), ensure_ascii=False)
    return props


def build_module_onnx(pipe: ModulePipeline, props: dict[str, str]) -> onnx.ModelProto:
    """Translate the pipeline (its current weights) into a contract-following ONNX model (opset 17)."""
    g = _Graph()
    F32 = TensorProto.FLOAT
    token = pipe.cfg.task == "token"
    data_in = (
        helper.make_tensor_value_info("tokens", TensorProto.INT64, [BATCH, TIME])
        if token
        else helper.make_tensor_value_info("x", F32, [BATCH, TIME, pipe.cfg.in_features])
    )
    out_name = "logits" if token else "y"
    x = data_in.name
    state_outs: list[tuple[str, str]] = []
    for i, (path, m) in enumerate(zip(pipe.paths, pipe.steps, strict=True)):
        tag = f"{path.replace('.', '_')}_{i}"
        if isinstance(m, nn.Embedding):
            x = g.op1("Gather", [g.const(f"{tag}_weight", _np(m.weight)), x], tag, axis=0)  # (B, T, E)
        elif isinstance(m, RECURRENT):
            pre = pipe.prefixes[path]
            seq = g.op1("Transpose", [x], f"{tag}_tbi", perm=[1, 0, 2])  # (T, B, I)
            c_in = f"state_in_{pre}c" if isinstance(m, nn.LSTM) else None
            y, h_out, c_out = fused_stack(g, _fused_layers(m), seq, f"state_in_{pre}h", c_in, f"{tag}_")
            x = g.op1("Transpose", [y], f"{tag}_bth", perm=[1, 0, 2])  # (B, T, H)
            state_outs.append((h_out, f"state_out_{pre}h"))
            if c_out is not None:
                state_outs.append((c_out, f"state_out_{pre}c"))
        else:
            x = _per_step(g, m, x, tag)
    g.named("Identity", [x], out_name)
    for src, dst in state_outs:
        g.named("Identity", [src], dst)
    data_out = helper.make_tensor_value_info(out_name, F32, [BATCH, TIME, pipe.cfg.out_features])
    states_in, states_out = [], []
    for s in pipe.state_shapes():
        states_in.append(helper.make_tensor_value_info(f"state_in_{s.name}", F32, [BATCH, *s.shape]))
        states_out.append(helper.make_tensor_value_info(f"state_out_{s.name}", F32, [BATCH, *s.shape]))
    graph = helper.make_graph(
        g.nodes, "rnnserve_torch_module", [data_in, *states_in], [data_out, *states_out], initializer=g.inits
    )
    graph.doc_string = __doc__.splitlines()[0]
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER, producer_version="1"
    )
    model.ir_version = 8
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model, full_check=True)
    return model


def _call_forward(module: nn.Module, x: Tensor) -> Tensor:
    """Call the user's ``forward(x)``, else ``forward(x, None)``; return the first tensor it returns."""
    try:
        out = module(x)
    except TypeError:
        out = module(x, None)
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"forward returned {type(out).__name__}, expected a tensor or a tuple starting with one"
        )
    return out


def check_forward(module: nn.Module, pipe: ModulePipeline, tol: float = 1e-5, seed: int = 0) -> CheckResult:
    """Check the user's forward (zero state) against the chain of layers read from it, at T=9, B=3."""
    name = "the module's forward(x) == the exported chain of layers (zero state, T=9, B=3)"
    gen = torch.Generator().manual_seed(seed)
    B, T = 3, 9
    if pipe.cfg.task == "token":
        x = torch.randint(0, pipe.cfg.vocab_size, (B, T), generator=gen)
    else:
        x = torch.randn(B, T, pipe.cfg.in_features, generator=gen)
    with torch.no_grad():
        ref, _ = pipe(x)  # (B, T, O)
        user_x = x if pipe.cfg.batch_first else x.transpose(0, 1)
        try:
            got = _call_forward(module, user_x)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported, not raised
            return CheckResult(
                name,
                False,
                detail=f"could not call forward(x) or forward(x, None): {type(exc).__name__}: {exc}; "
                "pass check_forward=False (the ORT == PyTorch checks still run on the chain)",
            )
    if not pipe.cfg.batch_first and got.dim() >= 2:
        got = got.transpose(0, 1)
    if tuple(got.shape) != tuple(ref.shape):
        return CheckResult(
            name,
            False,
            detail=f"forward returned shape {tuple(got.shape)} but the chain gives {tuple(ref.shape)} "
            "(per step); the exporter serves a per-step chain of layers: a forward that keeps only the "
            "last step or reorders layers is not that chain (list the layers with layers=[...])",
        )
    d = float((got.double() - ref.double()).abs().max())
    return CheckResult(name, d <= tol, d, "" if d <= tol else "the forward computes something else")


@dataclass(frozen=True)
class ModuleExport:
    """Result of :func:`export_module`: the ONNX model, its verification report, and where it went."""

    proto: onnx.ModelProto
    report: Report
    path: Path | None  # model.onnx written (None when nothing was written)
    layers: tuple[str, ...]


def export_module(
    module: nn.Module,
    repository: str | Path | None = None,
    name: str | None = None,
    *,
    version: int | None = None,
    output: str | Path | None = None,
    layers: Sequence[str] | None = None,
    vocabulary: Sequence[str] | None = None,
    description: str = "",
    data: str = "",
    metrics: dict[str, float] | None = None,
    check_forward_pass: bool = True,
    tol: float = 1e-5,
    progress: bool = True,
) -> ModuleExport:
    """Export a user's ``nn.Module`` (see the module docstring) to a verified, contract-following ONNX model.

    Writes ``<repository>/<name>/<version>/model.onnx`` (version: next free by default) with
    ``verification.txt`` next to it, or the single file ``output`` (report in ``<output>.verification.txt``),
    or nothing when neither is given. Raises :class:`UnsupportedModule` for a module it cannot export and
    ``export.pipeline.ExportError`` (writing nothing) when verification fails.
    """
    if (repository is None) != (name is None):
        raise ValueError("give both repository and name, or neither")
    chain = discover(module, layers)
    pipe = ModulePipeline(chain)
    meta = ModuleMeta(list(vocabulary) if vocabulary is not None else None, description, data, metrics or {})
    props = metadata(pipe, meta, type(module).__name__)
    proto = build_module_onnx(pipe, props)
    report = check_contract(proto, tol)
    if check_forward_pass:
        report.add(check_forward(module, pipe, tol))
    was_training = [m.training for m in pipe.steps]
    try:
        report.extend(verify_against_torch(proto, pipe, tol=tol, progress=progress))
    finally:
        for m, t in zip(pipe.steps, was_training, strict=True):
            m.train(t)  # verify_against_torch puts the model in eval mode; leave the user's as it was
    if not report.ok:
        raise ExportError(f"verification of {type(module).__name__} failed; nothing written", report)
    path = None
    if repository is not None and name is not None:
        model_dir = Path(repository) / name
        if version is None:
            existing = versions(model_dir)
            version = existing[-1] + 1 if existing else 1
        path = write_version(proto, report, model_dir, version)
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        path.with_name(path.name + ".verification.txt").write_text(report.format() + "\n")
    return ModuleExport(proto, report, path, tuple(p for p, _ in chain))


def load_module(spec: str) -> nn.Module:
    """Load the module a CLI spec names.

    ``file.py:attr`` or ``package.module:attr`` (an nn.Module, or a callable returning one), or a ``.pt``
    file holding a whole pickled module (``torch.save(model, path)``).
    """
    if ":" not in spec and spec.endswith((".pt", ".pth")):
        obj = torch.load(spec, map_location="cpu", weights_only=False)
    else:
        where, _, attr = spec.rpartition(":")
        if not where or not attr:
            raise SystemExit(
                f"module spec {spec!r}: expected file.py:attr, package.module:attr or a .pt file"
            )
        if where.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if mod_spec is None or mod_spec.loader is None:
                raise SystemExit(f"cannot import {where}")
            mod = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = mod
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
        obj = getattr(mod, attr)
        if not isinstance(obj, nn.Module) and callable(obj):
            obj = obj()
    if not isinstance(obj, nn.Module):
        raise SystemExit(f"{spec} is a {type(obj).__name__}, not an nn.Module")
    return obj


def main(argv: list[str] | None = None) -> int:
    """CLI: export a user's module; exit 0 when written, 1 when verification failed, 2 when unsupported."""
    ap = argparse.ArgumentParser(
        prog="python -m export.torch_module", description=__doc__.splitlines()[0].strip()
    )
    ap.add_argument("module", help="file.py:attr, package.module:attr (module or factory), or model.pt")
    ap.add_argument("--state-dict", type=Path, help="weights to load (torch.save(model.state_dict(), path))")
    ap.add_argument("--repository", type=Path, help="model repository to write <name>/<version>/ into")
    ap.add_argument("--name", help="model name in the repository")
    ap.add_argument("--version", type=int, help="version number (default: next free)")
    ap.add_argument("--output", type=Path, help="write this one ONNX file instead of a repository version")
    ap.add_argument("--layers", help="comma-separated submodule paths, in order (default: every leaf layer)")
    ap.add_argument("--vocabulary", type=Path, help="JSON list of strings, index = token id")
    ap.add_argument("--description", default="")
    ap.add_argument("--data", default="", help="description of the training data")
    ap.add_argument("--no-forward-check", action="store_true", help="skip forward(x) == chain of layers")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    if (args.repository is None) == (args.output is None) or (args.repository is not None and not args.name):
        ap.error("give --repository with --name, or --output")
    module = load_module(args.module)
    if args.state_dict is not None:
        module.load_state_dict(torch.load(args.state_dict, map_location="cpu"))
    module.eval()
    vocab = json.loads(args.vocabulary.read_text(encoding="utf-8")) if args.vocabulary else None
    try:
        result = export_module(
            module,
            args.repository,
            args.name,
            version=args.version,
            output=args.output,
            layers=args.layers.split(",") if args.layers else None,
            vocabulary=vocab,
            description=args.description,
            data=args.data,
            check_forward_pass=not args.no_forward_check,
            tol=args.tol,
        )
    except UnsupportedModule as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"EXPORT FAILED\n{exc}", file=sys.stderr)
        return 1
    print(result.report.format())
    print(f"layers: {' -> '.join(result.layers)}")
    print(f"wrote {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
