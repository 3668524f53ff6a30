"""Build the ONNX graph of a :class:`models.RecurrentModel` directly with ``onnx.helper``.

Why not ``torch.onnx.export``: the models are Python loops over time, so the TorchScript tracer unrolls
the loop into a graph for the one example length T it saw, and torch 2.13's ``dynamo=True`` exporter also
specialises the time axis to the example length (silently). A recurrent model served chunk by chunk needs
a truly dynamic T, so we emit the fused ONNX recurrent ops, whose time axis is dynamic by definition, and
copy the trained weights in:

- ``rnn`` -> ``RNN`` (tanh); ``gru`` -> ``GRU`` with ``linear_before_reset=1`` (PyTorch's formulation);
- ``lstm`` -> ``LSTM``; ``peephole`` -> ``LSTM`` with the peephole input ``P``; ``cifg`` -> ``LSTM`` with
  ``input_forget=1``; ``attention`` -> ``LSTM`` followed by a vectorised windowed-attention readout.

One op per layer, ``layout=0`` (ONNX Runtime's CPU kernels support only that), so the contract's
batch-first state ``(B, L, H)`` is transposed to ``(L, B, H)`` and sliced into the op's
``(num_directions=1, B, H)`` per layer, and the data are transposed between ``(B, T, ...)`` and the op's
``(T, B, ...)``.

Gate orders: PyTorch stacks LSTM gates (i, f, g, o), ONNX (i, o, f, c); GRU (r, z, n) vs ONNX (z, r, h);
ONNX's peephole ``P`` is (i, o, f). The cifg layer has no forget-gate weights; ONNX's op ignores the f
block when ``input_forget=1``, so it is written as zeros.

The attention readout (see ``models.cells.WindowAttention``) has no per-step loop: with
S = [window_in; h_1..h_T] (B, W+T, H), step t attends over S[t+1 .. t+W]; a row is valid when its index in S
is >= W - count_in. The windows are gathered a block of K = min(T, ATTENTION_BLOCK) steps at a time
inside an ONNX ``Loop`` (T padded up to a multiple of K), so memory stays O(B K W H) whatever the chunk
length, where gathering all T steps at once would hold B T W H floats. ``window_out`` is the last W rows of
S, ``count_out`` = min(count_in + T, W).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models import CheckpointMeta, RecurrentModel
from models.cells import GRULayer, LSTMLayer, RNNLayer

OPSET = 17
BATCH, TIME = "batch", "time"
ATTENTION_BLOCK = 32  # steps per Loop iteration of the attention readout (bounds its memory)
PRODUCER = "rnnserve.export"


class _Graph:
    """Accumulates nodes and initialisers with unique names."""

    def __init__(self, prefix: str = "", constant_nodes: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._prefix = prefix  # keeps a subgraph's names apart from the outer graph's
        self._constant_nodes = constant_nodes  # subgraphs: Constant nodes instead of initialisers

    def name(self, base: str) -> str:
        self._n += 1
        return f"{self._prefix}{base}_{self._n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self._constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(
        self, op_type: str, inputs: list[str], base: str | None = None, n_out: int = 1, **attrs
    ) -> list[str]:
        outs = [self.name(base or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"), **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, base, 1, **attrs)[0]

    def named(self, op_type: str, inputs: list[str], output: str, **attrs) -> None:
        self.nodes.append(
            helper.make_node(op_type, inputs, [output], name=self.name(f"n_{op_type}"), **attrs)
        )


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def lstm_onnx_weights(
    w_ih: np.ndarray,
    w_hh: np.ndarray,
    b_ih: np.ndarray,
    b_hh: np.ndarray,
    variant: str = "lstm",
    peephole: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Return ONNX (W, R, B, P) for one LSTM layer from PyTorch-ordered arrays, gate order (i, o, f, c).

    ``w_ih`` (G*H, I), ``w_hh`` (G*H, H), biases (G*H,) in PyTorch's (i, f, g, o) order (``cifg``: (i, g, o),
    G = 3); ``peephole`` (3, H) as (i, f, o) for the ``peephole`` variant.
    """
    H = w_hh.shape[1]

    def blocks(a: np.ndarray) -> dict[str, np.ndarray]:
        names = ("i", "g", "o") if variant == "cifg" else ("i", "f", "g", "o")
        out = {n: a[k * H : (k + 1) * H] for k, n in enumerate(names)}
        out.setdefault("f", np.zeros_like(out["i"]))  # ignored by the op when input_forget=1
        return out

    def onnx_order(a: np.ndarray) -> np.ndarray:
        b = blocks(a)
        return np.concatenate([b["i"], b["o"], b["f"], b["g"]], 0)

    W = onnx_order(w_ih)[None]  # (1, 4H, I)
    R = onnx_order(w_hh)[None]  # (1, 4H, H)
    B = np.concatenate([onnx_order(b_ih), onnx_order(b_hh)])[None]  # (1, 8H)
    P = None
    if peephole is not None:
        P = np.concatenate([peephole[0], peephole[2], peephole[1]])[None]  # (1, 3H) as (i, o, f)
    return W, R, B, P


def gru_onnx_weights(
    w_ih: np.ndarray, w_hh: np.ndarray, b_ih: np.ndarray, b_hh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ONNX (W, R, B) for one GRU layer, gate order (z, r, h) from PyTorch's (r, z, n)."""
    H = w_hh.shape[1]

    def reorder(a: np.ndarray) -> np.ndarray:
        r, z, n = a[:H], a[H : 2 * H], a[2 * H :]
        return np.concatenate([z, r, n], 0)

    W = reorder(w_ih)[None]  # (1, 3H, I)
    R = reorder(w_hh)[None]  # (1, 3H, H)
    B = np.concatenate([reorder(b_ih), reorder(b_hh)])[None]  # (1, 6H)
    return W, R, B


@dataclass(frozen=True)
class FusedLayer:
    """One layer as a fused ONNX recurrent op: ``op`` (RNN, LSTM or GRU), ONNX-ordered weights, attrs."""

    op: str
    W: np.ndarray  # (1, G*H, I)
    R: np.ndarray  # (1, G*H, H)
    B: np.ndarray  # (1, 2*G*H)
    P: np.ndarray | None = None  # LSTM peepholes (1, 3H)
    attrs: tuple[tuple[str, object], ...] = ()  # e.g. (("linear_before_reset", 1),)


def _fused_layer(layer: nn.Module) -> FusedLayer:
    """Our models' layer classes -> :class:`FusedLayer`."""
    w = [_np(p) for p in (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh)]
    if isinstance(layer, LSTMLayer):
        p = _np(layer.weight_p) if layer.variant == "peephole" else None
        W, R, B, P = lstm_onnx_weights(*w, variant=layer.variant, peephole=p)
        return FusedLayer("LSTM", W, R, B, P, (("input_forget", 1 if layer.variant == "cifg" else 0),))
    if isinstance(layer, GRULayer):
        return FusedLayer("GRU", *gru_onnx_weights(*w), attrs=(("linear_before_reset", 1),))
    if isinstance(layer, RNNLayer):
        B = np.concatenate([w[2], w[3]])[None]  # (1, 2H)
        return FusedLayer("RNN", w[0][None], w[1][None], B, attrs=(("activations", ["Tanh"]),))
    raise TypeError(f"cannot export layer {type(layer).__name__}")  # pragma: no cover


def fused_stack(
    g: _Graph, layers: list[FusedLayer], seq_tbi: str, h_bl: str, c_bl: str | None, tag: str = ""
) -> tuple[str, str, str | None]:
    """Emit one fused op per layer on ``seq_tbi`` (T, B, I) from the contract's batch-first states.

    ``h_bl``/``c_bl``: the states (B, L, H) (``c_bl`` only for LSTM stacks). Returns the top layer's outputs
    (T, B, H) and the new states, batch first (B, L, H).
    """
    H = layers[0].R.shape[2]
    h_all = g.op1("Transpose", [h_bl], f"{tag}h_lbh", perm=[1, 0, 2])  # (L, B, H)
    c_all = None if c_bl is None else g.op1("Transpose", [c_bl], f"{tag}c_lbh", perm=[1, 0, 2])  # (L, B, H)
    axes0 = g.const("axes0", np.array([0], np.int64))
    axes1 = g.const("axes1", np.array([1], np.int64))
    hs, cs = [], []
    x = seq_tbi
    for i, layer in enumerate(layers):
        lo, hi = g.const("lo", np.array([i], np.int64)), g.const("hi", np.array([i + 1], np.int64))
        h0 = g.op1("Slice", [h_all, lo, hi, axes0], f"{tag}h0_l{i}")  # (1, B, H)
        ins = [x, g.const(f"{tag}W_l{i}", layer.W), g.const(f"{tag}R_l{i}", layer.R)]
        ins += [g.const(f"{tag}B_l{i}", layer.B), "", h0]
        attrs = dict(layer.attrs)
        if layer.op == "LSTM":
            if c_all is None:
                raise ValueError("an LSTM stack needs a cell state")
            ins.append(g.op1("Slice", [c_all, lo, hi, axes0], f"{tag}c0_l{i}"))  # (1, B, H)
            if layer.P is not None:
                ins.append(g.const(f"{tag}P_l{i}", layer.P))
            y, yh, yc = g.op("LSTM", ins, f"{tag}lstm_l{i}", 3, hidden_size=H, **attrs)
            cs.append(yc)
        else:
            y, yh = g.op(layer.op, ins, f"{tag}{layer.op.lower()}_l{i}", 2, hidden_size=H, **attrs)
        hs.append(yh)
        x = g.op1("Squeeze", [y, axes1], f"{tag}y_l{i}")  # (T, 1, B, H) -> (T, B, H)
    h_out = hs[0] if len(hs) == 1 else g.op1("Concat", hs, f"{tag}h_cat", axis=0)  # (L, B, H)
    h_out = g.op1("Transpose", [h_out], f"{tag}h_out", perm=[1, 0, 2])  # (B, L, H)
    c_out = None
    if cs:
        c_out = cs[0] if len(cs) == 1 else g.op1("Concat", cs, f"{tag}c_cat", axis=0)  # (L, B, H)
        c_out = g.op1("Transpose", [c_out], f"{tag}c_out", perm=[1, 0, 2])  # (B, L, H)
    return x, h_out, c_out


def _attention_block_body(W: int, H: int, q_pad: str, s_pad: str, thresh: str, k: str) -> onnx.GraphProto:
    """Loop body: attention of block i's K steps over their windows, gathered as (B, K, W, H).

    Step t (global) attends over S rows t+1 .. t+W of S = [window_in; h_1 .. h_T]; a row is valid when its
    index is >= W - count_in (``thresh``). Reads q_pad, s_pad, thresh and K from the outer graph.
    """
    b = _Graph(prefix="blk_", constant_nodes=True)
    lo = b.op1("Mul", ["blk_i", k], "lo")  # scalar
    hi = b.op1("Add", [lo, k], "hi")
    steps = b.op1("Range", [lo, hi, b.const("one", np.array(1, np.int64))], "steps")  # (K,)
    axes0 = b.const("axes0", np.array([0], np.int64))
    axes1 = b.const("axes1", np.array([1], np.int64))
    q_blk = b.op1(
        "Slice", [q_pad, b.op1("Unsqueeze", [lo, axes0]), b.op1("Unsqueeze", [hi, axes0]), axes1], "q_blk"
    )  # (B, K, H)
    idx = b.op1(
        "Add",
        [b.op1("Unsqueeze", [steps, axes1]), b.const("slot1", np.arange(1, W + 1, dtype=np.int64)[None])],
        "idx",
    )  # (K, W): S rows attended by each step
    win = b.op1("Gather", [s_pad, idx], "win", axis=1)  # (B, K, W, H)
    q4 = b.op1("Unsqueeze", [q_blk, b.const("axes3", np.array([3], np.int64))], "q4")  # (B, K, H, 1)
    scores = b.op1("MatMul", [win, q4], "scores4")  # (B, K, W, 1)
    scores = b.op1("Squeeze", [scores, b.const("axes3", np.array([3], np.int64))], "scores")  # (B, K, W)
    scores = b.op1("Mul", [scores, b.const("scale", np.array(1.0 / math.sqrt(H), np.float32))], "scaled")
    valid = b.op1("GreaterOrEqual", [idx, thresh], "valid")  # (B, K, W)
    masked = b.op1("Where", [valid, scores, b.const("neginf", np.array(-np.inf, np.float32))], "masked")
    attn = b.op1("Softmax", [masked], "attn", axis=-1)  # (B, K, W)
    attn4 = b.op1("Unsqueeze", [attn, b.const("axes2", np.array([2], np.int64))], "attn4")  # (B, K, 1, W)
    ctx = b.op1("MatMul", [attn4, win], "ctx4")  # (B, K, 1, H)
    b.named("Squeeze", [ctx, b.const("axes2", np.array([2], np.int64))], "blk_ctx")  # (B, K, H)
    b.named("Identity", ["blk_cond_in"], "blk_cond_out")
    return helper.make_graph(
        b.nodes,
        "attention_block",
        [
            helper.make_tensor_value_info("blk_i", TensorProto.INT64, []),
            helper.make_tensor_value_info("blk_cond_in", TensorProto.BOOL, None),
        ],
        [
            helper.make_tensor_value_info("blk_cond_out", TensorProto.BOOL, None),
            helper.make_tensor_value_info("blk_ctx", TensorProto.FLOAT, None),
        ],
    )


def _attention(g: _Graph, model: RecurrentModel, top: str) -> str:
    """Emit the attention readout on top (B, T, H) and state_out_window/count; return (B, T, H)."""
    att = model.attention
    W, H = att.window, att.hidden
    S = g.op1("Concat", ["state_in_window", top], "S", axis=1)  # (B, W+T, H)
    t_vec = g.op1("Shape", [top], "T", start=1, end=2)  # (1,) int64
    q = g.op1("MatMul", [top, g.const("W_a", _np(att.weight_a))], "q")  # (B, T, H)
    count = g.op1("Max", ["state_in_count", g.const("zero", np.array([0], np.int64))], "count_lo")
    count = g.op1("Min", [count, g.const("Wmax", np.array([W], np.int64))], "count_in")  # clamp to 0..W
    thresh = g.op1("Sub", [g.const("W", np.array(W, np.int64)), count], "thresh")  # (B, 1)
    thresh = g.op1("Unsqueeze", [thresh, g.const("axes2", np.array([2], np.int64))], "thresh3")  # (B, 1, 1)
    # Time in blocks of K = min(T, ATTENTION_BLOCK) steps, padded to nb * K, so one Loop iteration holds only
    # (B, K, W, H) of gathered window, whatever T is; a streaming step (T = 1) is one iteration of one step.
    k1 = g.op1("Min", [t_vec, g.const("block", np.array([ATTENTION_BLOCK], np.int64))], "K")  # (1,)
    nb1 = g.op1(
        "Div",
        [g.op1("Sub", [g.op1("Add", [t_vec, k1]), g.const("one", np.array([1], np.int64))]), k1],
        "n_blocks",
    )  # (1,) = ceil(T / K)
    pad = g.op1("Sub", [g.op1("Mul", [nb1, k1]), t_vec], "pad")  # (1,)
    zeros4 = g.const("zeros4", np.zeros(4, np.int64))
    pads = g.op1("Concat", [zeros4, pad, g.const("zero", np.array([0], np.int64))], "pads", axis=0)  # (6,)
    q_pad = g.op1("Pad", [q, pads], "q_pad")  # (B, nb*K, H)
    s_pad = g.op1("Pad", [S, pads], "S_pad")  # (B, W + nb*K, H)
    k0 = g.op1("Squeeze", [k1, g.const("axes0", np.array([0], np.int64))], "K_scalar")
    nb0 = g.op1("Squeeze", [nb1, g.const("axes0", np.array([0], np.int64))], "n_blocks_scalar")
    body = _attention_block_body(W, H, q_pad, s_pad, thresh, k0)
    cond = g.const("true", np.array(True))
    ctx_blocks = g.op1("Loop", [nb0, cond], "ctx_blocks", body=body)  # (nb, B, K, H)
    ctx = g.op1("Transpose", [ctx_blocks], "ctx_bnkh", perm=[1, 0, 2, 3])  # (B, nb, K, H)
    ctx = g.op1(
        "Reshape", [ctx, g.const("shape_bth", np.array([0, -1, H], np.int64))], "ctx_pad"
    )  # (B, nb*K, H)
    ctx = g.op1(
        "Slice",
        [ctx, g.const("zero", np.array([0], np.int64)), t_vec, g.const("axes1", np.array([1], np.int64))],
        "ctx",
    )  # (B, T, H)
    cat = g.op1("Concat", [ctx, top], "ctx_h", axis=2)  # (B, T, 2H)
    comb = g.op1("MatMul", [cat, g.const("W_c", _np(att.combine.weight).T)], "comb")  # (B, T, H)
    comb = g.op1("Add", [comb, g.const("b_c", _np(att.combine.bias))], "comb_b")
    out = g.op1("Tanh", [comb], "attended")  # (B, T, H)
    g.named(
        "Slice",
        [
            S,
            g.const("start", np.array([-W], np.int64)),
            g.const("end", np.array([np.iinfo(np.int64).max], np.int64)),
            g.const("axes1", np.array([1], np.int64)),
        ],
        "state_out_window",
    )  # (B, W, H)
    summed = g.op1("Add", [count, t_vec], "count_sum")  # (B, 1)
    g.named("Min", [summed, g.const("Wmax", np.array([W], np.int64))], "state_out_count")  # (B, 1)
    return out


def metadata_props(
    model: RecurrentModel, meta: CheckpointMeta, checkpoint_sha256: str = ""
) -> dict[str, str]:
    """Return the ``rnnserve.*`` metadata_props of the contract (docs/DESIGN.md section 1)."""
    cfg = model.cfg
    props = {
        "rnnserve.family": cfg.family,
        "rnnserve.task": cfg.task,
        "rnnserve.data": meta.data,
        "rnnserve.metrics": json.dumps(meta.metrics, sort_keys=True),
        "rnnserve.description": meta.description
        or f"{cfg.family} {cfg.task} model, {cfg.layers}x{cfg.hidden}",
        "rnnserve.config": json.dumps(asdict(cfg), sort_keys=True),
    }
    if cfg.task == "token":
        vocab = meta.vocabulary
        if vocab is None:
            raise ValueError("token model checkpoint has no meta['vocabulary']; the contract requires it")
        if len(vocab) != cfg.vocab_size:
            raise ValueError(
                f"vocabulary has {len(vocab)} entries but the model's vocab_size is {cfg.vocab_size}"
            )
        props["rnnserve.vocabulary"] = json.dumps(list(vocab), ensure_ascii=False)
    if checkpoint_sha256:
        props["rnnserve.checkpoint_sha256"] = checkpoint_sha256
    return props


def build_onnx(
    model: RecurrentModel, meta: CheckpointMeta | None = None, checkpoint_sha256: str = ""
) -> onnx.ModelProto:
    """Translate ``model`` (its current weights) into a contract-following ONNX model (opset 17)."""
    meta = meta or CheckpointMeta()
    cfg = model.cfg
    g = _Graph()
    F32 = TensorProto.FLOAT
    if cfg.task == "token":
        data_in = helper.make_tensor_value_info("tokens", TensorProto.INT64, [BATCH, TIME])
        data_out = helper.make_tensor_value_info("logits", F32, [BATCH, TIME, cfg.vocab_size])
        seq = g.op1(
            "Gather", [g.const("embedding", _np(model.embedding.weight)), "tokens"], "embedded", axis=0
        )
    else:
        data_in = helper.make_tensor_value_info("x", F32, [BATCH, TIME, cfg.in_features])
        data_out = helper.make_tensor_value_info("y", F32, [BATCH, TIME, cfg.out_features])
        seq = "x"
    seq_tbi = g.op1("Transpose", [seq], "seq_tbi", perm=[1, 0, 2])  # (T, B, I)
    has_c = "c" in {s.name for s in model.state_shapes()}
    layers = [_fused_layer(layer) for layer in model.layers]
    top_tbh, h_out, c_out = fused_stack(g, layers, seq_tbi, "state_in_h", "state_in_c" if has_c else None)
    g.named("Identity", [h_out], "state_out_h")  # (B, L, H)
    if c_out is not None:
        g.named("Identity", [c_out], "state_out_c")  # (B, L, H)
    top = g.op1("Transpose", [top_tbh], "top", perm=[1, 0, 2])  # (B, T, H)
    if cfg.family == "attention":
        top = _attention(g, model, top)
    head = g.op1("MatMul", [top, g.const("head_W", _np(model.head.weight).T)], "head")  # (B, T, O)
    g.named("Add", [head, g.const("head_b", _np(model.head.bias))], data_out.name)

    states_in, states_out = [], []
    for s in model.state_shapes():
        dtype = F32 if s.dtype.is_floating_point else TensorProto.INT64  # count is the only int state
        states_in.append(helper.make_tensor_value_info(f"state_in_{s.name}", dtype, [BATCH, *s.shape]))
        states_out.append(helper.make_tensor_value_info(f"state_out_{s.name}", dtype, [BATCH, *s.shape]))
    graph = helper.make_graph(
        g.nodes,
        f"rnnserve_{cfg.family}_{cfg.task}",
        [data_in, *states_in],
        [data_out, *states_out],
        initializer=g.inits,
    )
    graph.doc_string = __doc__.splitlines()[0]
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER, producer_version="1"
    )
    onnx_model.ir_version = 8  # opset 17 era; readable by every ONNX Runtime >= 1.13
    for k, v in metadata_props(model, meta, checkpoint_sha256).items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def file_sha256(path) -> str:
    """Hex SHA-256 of a file (recorded in the metadata so unchanged checkpoints are not re-exported)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
