"""Recurrent layers, written out from their equations (one layer = one fused ONNX op at export time).

Each layer runs a whole sequence: the input projection ``x W_ih^T + b_ih`` for every step is one matmul up
front, and only the hidden-to-hidden recurrence loops over time. Parameters keep PyTorch's names and gate
order (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) so weights copy one-to-one from
``torch.nn.RNN/LSTM/GRU``; the exporter reorders gates to ONNX's order.

References
----------
- Elman, "Finding structure in time", Cognitive Science 1990 (``rnn``: h_t = tanh(W x_t + U h_{t-1} + b)).
- Hochreiter & Schmidhuber, "Long short-term memory", Neural Computation 1997; with the forget gate of
  Gers, Schmidhuber & Cummins, "Learning to forget", 2000 (``lstm``).
  C. Olah, "Understanding LSTM Networks", 2015; MIT 6.S191 lecture 2 (recurrent networks).
- Gers & Schmidhuber, "Recurrent nets that time and count", IJCNN 2000 (``peephole``: i and f see c_{t-1},
  o sees c_t, through diagonal weights -- exactly the ONNX LSTM input ``P``).
- Greff et al., "LSTM: A Search Space Odyssey", IEEE TNNLS 2017 (``cifg``: coupled input and forget gate,
  f_t = 1 - i_t -- the ONNX LSTM attribute ``input_forget=1``).
- Cho et al., "Learning phrase representations using RNN encoder-decoder", EMNLP 2014 (``gru``), in PyTorch's
  formulation where the reset gate multiplies ``(W_hn h + b_hn)``, i.e. ONNX GRU ``linear_before_reset=1``.
- Luong, Pham & Manning, "Effective approaches to attention-based neural machine translation", EMNLP 2015
  ("general" score h_t^T W_a h_s and attentional hidden state tanh(W_c [c_t; h_t])), scaled by 1/sqrt(H) as in
  Vaswani et al., "Attention is all you need", 2017; attending over the network's own past states as in
  Cheng, Dong & Lapata, "Long short-term memory-networks for machine reading", EMNLP 2016 (``attention``).

"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _uniform_(params: list[nn.Parameter], hidden: int) -> None:
    """PyTorch's RNN initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias."""
    bound = 1.0 / math.sqrt(hidden)
    for p in params:
        nn.init.uniform_(p, -bound, bound)


class RNNLayer(nn.Module):
    """Elman tanh RNN layer: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(hidden, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(hidden))
        self.bias_hh = nn.Parameter(torch.empty(hidden))
        _uniform_(list(self.parameters()), hidden)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Run a sequence. x (B, T, I), h (B, H) -> outputs (B, T, H), last h (B, H)."""
        xp = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, H)
        outs = []
        for t in range(x.shape[1]):
            h = torch.tanh(xp[:, t] + F.linear(h, self.weight_hh, self.bias_hh))  # (B, H)
            outs.append(h)
        return torch.stack(outs, 1), h  # (B, T, H), (B, H)


class LSTMLayer(nn.Module):
    """LSTM layer in three variants: ``lstm``, ``peephole`` (Gers & Schmidhuber 2000), ``cifg`` (f = 1 - i).

    Gate order of the stacked weights is PyTorch's: (i, f, g, o) for lstm/peephole, (i, g, o) for cifg, which
    has no forget-gate weights at all. Peephole weights ``weight_p`` (3, H) are the diagonal connections
    (p_i, p_f, p_o).
    """

    def __init__(self, input_size: int, hidden: int, variant: str = "lstm") -> None:
        super().__init__()
        if variant not in ("lstm", "peephole", "cifg"):
            raise ValueError(f"LSTM variant must be lstm, peephole or cifg, got {variant!r}")
        self.hidden = hidden
        self.variant = variant
        gates = 3 if variant == "cifg" else 4
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(gates * hidden))
        self.bias_hh = nn.Parameter(torch.empty(gates * hidden))
        if variant == "peephole":
            self.weight_p = nn.Parameter(torch.empty(3, hidden))
        _uniform_(list(self.parameters()), hidden)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run a sequence. x (B, T, I), h and c (B, H) -> outputs (B, T, H), last h (B, H), last c (B, H)."""
        xp = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, G*H)
        outs = []
        for t in range(x.shape[1]):
            gates = xp[:, t] + F.linear(h, self.weight_hh, self.bias_hh)  # (B, G*H)
            if self.variant == "cifg":
                a_i, a_g, a_o = gates.chunk(3, 1)  # each (B, H)
                i = torch.sigmoid(a_i)
                f = 1.0 - i
            else:
                a_i, a_f, a_g, a_o = gates.chunk(4, 1)  # each (B, H)
                if self.variant == "peephole":
                    a_i = a_i + self.weight_p[0] * c  # input gate sees c_{t-1}
                    a_f = a_f + self.weight_p[1] * c  # forget gate sees c_{t-1}
                i = torch.sigmoid(a_i)
                f = torch.sigmoid(a_f)
            c = f * c + i * torch.tanh(a_g)  # (B, H)
            if self.variant == "peephole":
                a_o = a_o + self.weight_p[2] * c  # output gate sees c_t
            h = torch.sigmoid(a_o) * torch.tanh(c)  # (B, H)
            outs.append(h)
        return torch.stack(outs, 1), h, c  # (B, T, H), (B, H), (B, H)


class GRULayer(nn.Module):
    """GRU layer (Cho et al. 2014) in PyTorch's formulation, gate order (r, z, n).

    r = sigma(W_ir x + b_ir + W_hr h + b_hr); z = sigma(W_iz x + b_iz + W_hz h + b_hz);
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n + z * h.
    """

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden))
        _uniform_(list(self.parameters()), hidden)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Run a sequence. x (B, T, I), h (B, H) -> outputs (B, T, H), last h (B, H)."""
        xp = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, 3H)
        outs = []
        for t in range(x.shape[1]):
            x_r, x_z, x_n = xp[:, t].chunk(3, 1)  # each (B, H)
            h_r, h_z, h_n = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, 1)  # each (B, H)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)  # reset gate applied after the linear map (linear_before_reset=1)
            h = (1.0 - z) * n + z * h  # (B, H)
            outs.append(h)
        return torch.stack(outs, 1), h  # (B, T, H), (B, H)


class WindowAttention(nn.Module):
    """Attention of each top-layer output over a bounded window of the layer's own recent outputs.

    At step t the window is shifted left and h_t appended (most recent last), the fill count saturates at W,
    and only the ``count`` most recent slots are attended to (so the current h_t always is):

        s_j = (h_t^T W_a h_j) / sqrt(H)       over the filled slots j   (Luong 2015 "general" score, scaled)
        a   = softmax(s);  ctx_t = sum_j a_j h_j
        o_t = tanh(W_c [ctx_t; h_t] + b_c)                               (Luong 2015 attentional hidden state)

    The window (B, W, H) and its fill count (B, 1) int64 are carried state, so any split of a stream into
    chunks gives the same outputs as one pass. The recurrence below stays a plain LSTM (fused op at export
    time).
    """

    def __init__(self, hidden: int, window: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.window = window
        self.weight_a = nn.Parameter(torch.empty(hidden, hidden))
        self.combine = nn.Linear(2 * hidden, hidden)  # W_c over [ctx; h]
        nn.init.xavier_uniform_(self.weight_a)

    def forward(self, hs: Tensor, win: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attend. hs (B, T, H), win (B, W, H), count (B, 1) int64 -> outputs (B, T, H), win, count."""
        W = self.window
        slots = torch.arange(W, device=hs.device)  # (W,)
        scale = 1.0 / math.sqrt(self.hidden)
        count = count.clamp(0, W)  # a count set from outside (SetState) cannot empty or overfill the window
        outs = []
        for t in range(hs.shape[1]):
            h = hs[:, t]  # (B, H)
            win = torch.cat([win[:, 1:], h[:, None]], 1)  # (B, W, H), most recent last
            count = torch.clamp(count + 1, max=W)  # (B, 1)
            valid = slots[None, :] >= (W - count)  # (B, W)
            q = h @ self.weight_a  # (B, H): h^T W_a
            scores = torch.einsum("bh,bwh->bw", q, win) * scale  # (B, W)
            scores = scores.masked_fill(~valid, float("-inf"))
            attn = torch.softmax(scores, -1)  # (B, W)
            ctx = torch.einsum("bw,bwh->bh", attn, win)  # (B, H)
            outs.append(torch.tanh(self.combine(torch.cat([ctx, h], -1))))  # (B, H)
        return torch.stack(outs, 1), win, count  # (B, T, H), (B, W, H), (B, 1)
