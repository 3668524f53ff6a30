"""Model equivalences: PyTorch built-ins, the NumPy equations, and streaming invariance, for every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import (
    FAMILIES,
    LSTM_FAMILIES,
    CheckpointMeta,
    ModelConfig,
    build_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from models.reference import reference_forward

TOL = 1e-5


def tiny(family: str, task: str = "numeric", **kw) -> ModelConfig:
    base = dict(vocab_size=13, in_features=3, out_features=2, hidden=8, layers=2, window=16)
    base.update(kw)
    return ModelConfig(family, task, **base)


def perturbed(cfg: ModelConfig, seed: int = 0):
    """A model whose weights are far from the init (larger, so gate saturation and peepholes matter)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def random_input(cfg: ModelConfig, batch: int, steps: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg.task == "token":
        return torch.randint(0, cfg.vocab_size, (batch, steps), generator=g)
    return torch.randn(batch, steps, cfg.in_features, generator=g)


def random_state(model, batch: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in model.state_shapes():
        if s.name == "count":
            out[s.name] = torch.randint(0, model.cfg.window + 1, (batch, *s.shape), generator=g)
        else:
            out[s.name] = 0.5 * torch.randn(batch, *s.shape, generator=g)
    return out


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("family", ["rnn", "lstm", "gru"])
def test_equals_torch_builtin(family):
    cfg = tiny(family)
    model = perturbed(cfg)
    builtin_cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[family]
    builtin = builtin_cls(cfg.in_features, cfg.hidden, num_layers=cfg.layers, batch_first=True)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(builtin, f"{name}_l{i}").copy_(getattr(layer, name))
    x = random_input(cfg, 4, 23)
    state = random_state(model, 4)
    with torch.no_grad():
        y, st = model(x, state)
        h0 = state["h"].transpose(0, 1).contiguous()  # (L, B, H)
        if family == "lstm":
            seq, (hn, cn) = builtin(x, (h0, state["c"].transpose(0, 1).contiguous()))
            assert max_abs(st["c"], cn.transpose(0, 1)) <= TOL
        else:
            seq, hn = builtin(x, h0)
        y_ref = model.head(seq)
    assert max_abs(y, y_ref) <= TOL
    assert max_abs(st["h"], hn.transpose(0, 1)) <= TOL


@pytest.mark.parametrize("task", ["token", "numeric"])
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_numpy_equations(family, task):
    cfg = tiny(family, task)
    model = perturbed(cfg, seed=3)
    x = random_input(cfg, 3, 40)  # longer than the attention window, so it saturates
    state = random_state(model, 3)
    with torch.no_grad():
        y, st = model(x, state)
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    y_ref, st_ref = reference_forward(cfg, params, x.numpy(), {k: v.numpy() for k, v in state.items()})
    assert max_abs(y, y_ref) <= TOL
    assert set(st) == set(st_ref)
    for name in st:
        assert max_abs(st[name], st_ref[name]) <= TOL, name


def test_reference_detects_a_wrong_weight():
    """The equivalence test can fail: one perturbed peephole weight breaks it."""
    cfg = tiny("peephole")
    model = perturbed(cfg)
    x = random_input(cfg, 2, 10)
    with torch.no_grad():
        y, _ = model(x)
    params = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    params["layers.0.weight_p"][2, 0] += 0.5
    y_ref, _ = reference_forward(cfg, params, x.numpy())
    assert max_abs(y, y_ref) > 1e-3


@pytest.mark.parametrize("task", ["token", "numeric"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_invariance(family, task):
    cfg = tiny(family, task)
    model = perturbed(cfg, seed=5)
    x = random_input(cfg, 2, 57)
    with torch.no_grad():
        y_full, st_full = model(x)
        pieces, st = [], None
        for lo, hi in [(0, 1), (1, 9), (9, 10), (10, 33), (33, 57)]:
            y, st = model(x[:, lo:hi], st)
            pieces.append(y)
    assert max_abs(torch.cat(pieces, 1), y_full) <= TOL
    for name in st_full:
        assert max_abs(st[name], st_full[name]) <= TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_state_contract_shapes(family):
    cfg = tiny(family, "token", window=24)
    model = build_model(cfg)
    st = model.init_state(5)
    expected = {"h": (5, 2, 8)}
    if family in LSTM_FAMILIES:
        expected["c"] = (5, 2, 8)
    if family == "attention":
        expected.update(window=(5, 24, 8), count=(5, 1))
    assert {k: tuple(v.shape) for k, v in st.items()} == expected
    if family == "attention":
        assert st["count"].dtype == torch.int64
    y, st2 = model(random_input(cfg, 5, 3))
    assert y.shape == (5, 3, 13)
    assert {k: tuple(v.shape) for k, v in st2.items()} == expected


def test_attention_window_and_count():
    cfg = tiny("attention", window=16)
    model = perturbed(cfg)
    x = random_input(cfg, 1, 20)
    with torch.no_grad():
        _, st = model(x[:, :5])
        assert st["count"].item() == 5
        _, st = model(x[:, 5:], st)
    assert st["count"].item() == 16  # saturates at W
    # The window holds the last W top-layer hidden states, most recent last: last row == top-layer h.
    assert max_abs(st["window"][:, -1], st["h"][:, -1]) == 0.0


def test_checkpoint_roundtrip(tmp_path):
    cfg = tiny("cifg", "token")
    model = perturbed(cfg)
    meta = CheckpointMeta(
        vocabulary=[chr(97 + i) for i in range(13)], data="synthetic", metrics={"val_bpc": 1.5}
    )
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, meta)
    ck = read_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ck.config == cfg and ck.meta.metrics == {"val_bpc": 1.5} and ck.meta.vocabulary == meta.vocabulary
    x = random_input(cfg, 2, 6)
    with torch.no_grad():
        assert max_abs(load_checkpoint(tmp_path / "run" / "ckpt.pt")(x)[0], model(x)[0]) == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        dict(family="bogus", task="numeric", in_features=1, out_features=1),
        dict(family="lstm", task="words", in_features=1, out_features=1),
        dict(family="lstm", task="token"),
        dict(family="gru", task="numeric", in_features=0, out_features=1),
        dict(family="attention", task="numeric", in_features=1, out_features=1, window=8),
    ],
)
def test_config_validation(kw):
    with pytest.raises(ValueError):
        ModelConfig(**kw)


def test_attention_count_out_of_range_is_clamped():
    """A fill count set from outside (SetState) outside 0..W behaves as the nearest valid count."""
    cfg = tiny("attention", window=16)
    model = perturbed(cfg)
    x = random_input(cfg, 3, 5)
    state = random_state(model, 3)
    state["count"] = torch.tensor([[-4], [40], [3]])
    clamped = dict(state, count=torch.tensor([[0], [16], [3]]))
    with torch.no_grad():
        y, st = model(x, state)
        y_c, _ = model(x, clamped)
    assert torch.isfinite(y).all() and max_abs(y, y_c) == 0.0
    assert st["count"].ravel().tolist() == [5, 16, 8]
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    y_ref, _ = reference_forward(cfg, params, x.numpy(), {k: v.numpy() for k, v in state.items()})
    assert max_abs(y, y_ref) <= TOL
