"""Model configuration, the one recurrent model class, and checkpoints.

A model is embedding (token task) or raw features (numeric task) -> ``layers`` recurrent layers of one family
(see ``models/cells.py`` for the equations and papers) -> for ``attention`` a windowed self-attention readout
-> a linear head (logits over the vocabulary, or a regression output).

The carried state follows the ONNX state contract (docs/state-contract.md), batch axis first:
``h`` (B, L, H) for every family; ``c`` (B, L, H) for lstm, peephole, cifg and attention; attention adds
``window`` (B, W, H), the last W top-layer hidden states with the most recent last, and ``count`` (B, 1)
int64, how many of those slots are filled (saturating at W).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.cells import GRULayer, LSTMLayer, RNNLayer, WindowAttention

FAMILIES = ("rnn", "lstm", "peephole", "cifg", "gru", "attention")
TASKS = ("token", "numeric")
# Families whose recurrence is an LSTM (and so carry a cell state ``c``).
LSTM_FAMILIES = ("lstm", "peephole", "cifg", "attention")


@dataclass
class ModelConfig:
    """Architecture of a recurrent model; stored in every checkpoint as a plain dict."""

    family: str  # "rnn" | "lstm" | "peephole" | "cifg" | "gru" | "attention"
    task: str  # "token" | "numeric"
    vocab_size: int = 0  # token models
    in_features: int = 0  # numeric models
    out_features: int = 0  # numeric models (regression output size)
    hidden: int = 128
    layers: int = 1
    window: int = 32  # attention only, 16..64
    embed: int = 0  # token models: embedding size (0 -> hidden)
    dropout: float = 0.0  # training only: between layers and before the head

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "token" and self.vocab_size < 1:
            raise ValueError("token models need vocab_size >= 1")
        if self.task == "numeric" and (self.in_features < 1 or self.out_features < 1):
            raise ValueError("numeric models need in_features >= 1 and out_features >= 1")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError("hidden and layers must be >= 1")
        if self.family == "attention" and not 16 <= self.window <= 64:
            raise ValueError(f"attention window must be in 16..64, got {self.window}")

    @property
    def input_size(self) -> int:
        """Width of the first recurrent layer's input."""
        if self.task == "token":
            return self.embed or self.hidden
        return self.in_features

    @property
    def output_size(self) -> int:
        """Width of the head's output (vocabulary size or regression size)."""
        return self.vocab_size if self.task == "token" else self.out_features

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from ``asdict`` output, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class StateShape:
    """One carried state tensor: its contract name, shape without the batch axis, and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class RecurrentModel(nn.Module):
    """Token or numeric sequence model over one recurrent family, with explicit carried state."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        if cfg.task == "token":
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        layers: list[nn.Module] = []
        for i in range(cfg.layers):
            size = cfg.input_size if i == 0 else H
            if cfg.family == "rnn":
                layers.append(RNNLayer(size, H))
            elif cfg.family == "gru":
                layers.append(GRULayer(size, H))
            else:
                layers.append(LSTMLayer(size, H, "lstm" if cfg.family == "attention" else cfg.family))
        self.layers = nn.ModuleList(layers)
        if cfg.family == "attention":
            self.attention = WindowAttention(H, cfg.window)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(H, cfg.output_size)

    def state_shapes(self) -> list[StateShape]:
        """Return the carried state tensors, in contract order (h, c, window, count)."""
        cfg = self.cfg
        out = [StateShape("h", (cfg.layers, cfg.hidden), torch.float32)]
        if cfg.family in LSTM_FAMILIES:
            out.append(StateShape("c", (cfg.layers, cfg.hidden), torch.float32))
        if cfg.family == "attention":
            out.append(StateShape("window", (cfg.window, cfg.hidden), torch.float32))
            out.append(StateShape("count", (1,), torch.int64))
        return out

    def init_state(self, batch: int) -> dict[str, Tensor]:
        """Zero state for ``batch`` streams (names and shapes as the ONNX state contract)."""
        device = self.head.weight.device
        return {
            s.name: torch.zeros((batch, *s.shape), dtype=s.dtype, device=device) for s in self.state_shapes()
        }

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Run a chunk of T steps from ``state`` (zeros if None).

        token: x (B, T) int64 -> logits (B, T, V); numeric: x (B, T, F) float32 -> y (B, T, out_features).
        Returns the outputs and the state after the last step.
        """
        B = x.shape[0]
        if state is None:
            state = self.init_state(B)
        inp = self.embedding(x) if self.cfg.task == "token" else x  # (B, T, I)
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            if i > 0:
                inp = self.drop(inp)
            h0 = state["h"][:, i]  # (B, H)
            if isinstance(layer, LSTMLayer):
                inp, h, c = layer(inp, h0, state["c"][:, i])  # (B, T, H), (B, H), (B, H)
                cs.append(c)
            else:
                inp, h = layer(inp, h0)  # (B, T, H), (B, H)
            hs.append(h)
        new_state = {"h": torch.stack(hs, 1)}  # (B, L, H)
        if cs:
            new_state["c"] = torch.stack(cs, 1)  # (B, L, H)
        if self.cfg.family == "attention":
            inp, win, count = self.attention(inp, state["window"], state["count"])  # (B, T, H)
            new_state["window"], new_state["count"] = win, count
        return self.head(self.drop(inp)), new_state  # (B, T, V or out_features)


def build_model(cfg: ModelConfig) -> RecurrentModel:
    """Build a freshly initialised model for ``cfg``."""
    return RecurrentModel(cfg)


@dataclass
class CheckpointMeta:
    """Descriptive metadata stored with a checkpoint; the exporter copies it into the ONNX metadata_props."""

    vocabulary: list[str] | None = None  # token models: index = token id
    data: str = ""  # training data description
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"val_bpc": 2.1}
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the trainer wants to keep

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CheckpointMeta:
        """Tolerant reader: known keys go to fields, unknown keys to ``extra``."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(d.pop("extra", {}) or {})
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(**{k: v for k, v in d.items() if k in known}, extra=extra)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its config and its metadata."""

    model: RecurrentModel
    config: ModelConfig
    meta: CheckpointMeta


def save_checkpoint(
    path: str | Path, model: RecurrentModel, meta: CheckpointMeta | dict[str, Any] | None = None
) -> None:
    """Write ``{"config", "state_dict", "meta"}`` with ``torch.save`` (parent directories are created)."""
    if not isinstance(meta, CheckpointMeta):
        meta = CheckpointMeta.from_dict(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict(), "meta": asdict(meta)}, path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (or any dict with config/state_dict/meta)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=False)
    cfg = ModelConfig.from_dict(blob["config"])
    model = build_model(cfg)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return Checkpoint(model=model, config=cfg, meta=CheckpointMeta.from_dict(blob.get("meta")))


def load_checkpoint(path: str | Path) -> RecurrentModel:
    """Load a checkpoint's model, in eval mode."""
    return read_checkpoint(path).model
