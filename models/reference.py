"""NumPy reference implementation of every family's equations, one time step at a time, in float64.

Independent of ``models/cells.py`` (no shared code, gates sliced by name, the attention written over a
Python list of past states rather than a masked window) so the tests can check the PyTorch modules and the
ONNX export against the equations themselves. Reads parameters from a model's ``state_dict`` (PyTorch
names, PyTorch gate order); see ``models/cells.py`` for the papers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.core import LSTM_FAMILIES, ModelConfig


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def _lstm_step(
    p: Mapping[str, np.ndarray], pre: str, variant: str, x: np.ndarray, h: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    H = h.shape[-1]
    z = x @ p[pre + "weight_ih"].T + p[pre + "bias_ih"] + h @ p[pre + "weight_hh"].T + p[pre + "bias_hh"]
    if variant == "cifg":  # Greff et al. 2017: f_t = 1 - i_t, no forget-gate weights
        a_i, a_g, a_o = z[:, :H], z[:, H : 2 * H], z[:, 2 * H :]
        i = sigmoid(a_i)
        f = 1.0 - i
    else:
        a_i, a_f, a_g, a_o = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
        if variant == "peephole":  # Gers & Schmidhuber 2000: i, f see c_{t-1}
            a_i = a_i + p[pre + "weight_p"][0] * c
            a_f = a_f + p[pre + "weight_p"][1] * c
        i, f = sigmoid(a_i), sigmoid(a_f)
    c_new = f * c + i * np.tanh(a_g)
    if variant == "peephole":  # ... and o sees c_t
        a_o = a_o + p[pre + "weight_p"][2] * c_new
    return sigmoid(a_o) * np.tanh(c_new), c_new


def _gru_step(p: Mapping[str, np.ndarray], pre: str, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    H = h.shape[-1]
    gx = x @ p[pre + "weight_ih"].T + p[pre + "bias_ih"]
    gh = h @ p[pre + "weight_hh"].T + p[pre + "bias_hh"]
    r = sigmoid(gx[:, :H] + gh[:, :H])
    z = sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
    n = np.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
    return (1.0 - z) * n + z * h


def _rnn_step(p: Mapping[str, np.ndarray], pre: str, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.tanh(
        x @ p[pre + "weight_ih"].T + p[pre + "bias_ih"] + h @ p[pre + "weight_hh"].T + p[pre + "bias_hh"]
    )


def _attend(p: Mapping[str, np.ndarray], history: list[np.ndarray], h: np.ndarray) -> np.ndarray:
    """Attend with Luong's (2015) general score, scaled by 1/sqrt(H), over one filled window; return o_t."""
    keys = np.stack(history)  # (n, H), n = filled slots, current h last
    scores = keys @ (p["attention.weight_a"].T @ h) / np.sqrt(h.shape[0])  # h^T W_a h_j
    a = np.exp(scores - scores.max())
    a /= a.sum()
    ctx = a @ keys  # (H,)
    return np.tanh(p["attention.combine.weight"] @ np.concatenate([ctx, h]) + p["attention.combine.bias"])


def reference_forward(
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    state: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the model's equations on x (token (B, T) ids or numeric (B, T, F)); returns (outputs, state).

    ``params``: ``{name: array}`` from ``model.state_dict()``; ``state`` as in the contract (zeros if None).
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = x.shape[0], x.shape[1]
    L, H, W = cfg.layers, cfg.hidden, cfg.window
    h = np.zeros((B, L, H)) if state is None else np.array(state["h"], np.float64)
    c = np.zeros((B, L, H)) if state is None or "c" not in state else np.array(state["c"], np.float64)
    window = (
        np.zeros((B, W, H))
        if state is None or "window" not in state
        else np.array(state["window"], np.float64)
    )
    count = np.zeros((B, 1), np.int64) if state is None or "count" not in state else np.array(state["count"])
    count = np.clip(count, 0, W)  # the models clamp a fill count set from outside
    variant = "lstm" if cfg.family == "attention" else cfg.family
    # Per stream: the filled part of the window as a list of past top-layer states (oldest first).
    history = [[window[b, W - k] for k in range(int(min(count[b, 0], W)), 0, -1)] for b in range(B)]
    outs, tops = [], []
    for t in range(T):
        inp = p["embedding.weight"][x[:, t]] if cfg.task == "token" else np.asarray(x[:, t], np.float64)
        for layer in range(L):
            pre = f"layers.{layer}."
            if cfg.family in LSTM_FAMILIES:
                h[:, layer], c[:, layer] = _lstm_step(p, pre, variant, inp, h[:, layer], c[:, layer])
            elif cfg.family == "gru":
                h[:, layer] = _gru_step(p, pre, inp, h[:, layer])
            else:
                h[:, layer] = _rnn_step(p, pre, inp, h[:, layer])
            inp = h[:, layer].copy()
        tops.append(inp)
        if cfg.family == "attention":
            att = np.empty_like(inp)
            for b in range(B):
                history[b] = (history[b] + [inp[b]])[-W:]
                att[b] = _attend(p, history[b], inp[b])
            inp = att
        outs.append(inp @ p["head.weight"].T + p["head.bias"])
    new_state = {"h": h}
    if cfg.family in LSTM_FAMILIES:
        new_state["c"] = c
    if cfg.family == "attention":
        # The window shifts by one slot per step: the last W of [window_in; h_1 .. h_T] (slots beyond the fill
        # count keep stale values, which the count masks out).
        new_state["window"] = np.concatenate([window, np.stack(tops, 1)], 1)[:, -W:]
        new_state["count"] = np.minimum(count + T, W)
    return np.stack(outs, 1), new_state
