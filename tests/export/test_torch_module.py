"""Export of users' own nn.Modules: every recurrent kind and layout verifies, ORT equals the module's own
forward, the unsupported shapes are refused with a message naming the layer, a broken translation fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export.torch_module as tm
from export.contract import check_contract
from export.pipeline import ExportError
from export.torch_module import UnsupportedModule, export_module

ROOT = Path(__file__).resolve().parents[2]
VOCAB = [chr(ord("a") + i) for i in range(12)]
KINDS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class TokenModel(nn.Module):
    """The common user shape: embedding -> recurrent -> linear head; forward(x, state=None)."""

    def __init__(self, kind, batch_first: bool = True, num_layers: int = 2, **kw) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.rnn = kind(8, 16, num_layers=num_layers, batch_first=batch_first, **kw)
        self.head = nn.Linear(16, len(VOCAB))

    def forward(self, x, state=None):
        y, state = self.rnn(self.embed(x), state)
        return self.head(y), state


class NumericModel(nn.Module):
    """Numeric input, per-step layers before and after, two recurrent layers (time-major, the default)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.LayerNorm(10), nn.Dropout(0.3))
        self.rnn1 = nn.GRU(10, 12)
        self.rnn2 = nn.RNN(12, 6, num_layers=3, nonlinearity="relu", bias=False)
        self.post = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.SiLU(), nn.Linear(5, 2), nn.LogSoftmax(-1))

    def forward(self, x):
        y, _ = self.rnn1(self.pre(x))
        y, _ = self.rnn2(y)
        return self.post(y)


def _ort(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _zero_states(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    return {
        i.name: np.zeros((batch, *i.shape[1:]), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("state_in_")
    }


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_token_module_of_each_kind(kind, batch_first):
    torch.manual_seed(0)
    model = TokenModel(KINDS[kind], batch_first).eval()
    result = export_module(model, vocabulary=VOCAB, progress=False)
    assert result.report.ok, result.report.format()
    names = [c.name for c in result.report.checks]
    assert any(n.startswith("ORT == PyTorch at T=64, B=64") for n in names)
    assert any(n.startswith("ORT chunked stream == PyTorch one pass") for n in names)
    assert any(n.startswith("the module's forward(x)") for n in names)
    # Independently of the report: ORT from a zero state equals the user's own forward (in its own layout).
    sess = _ort(result.proto)
    ids = np.random.default_rng(1).integers(0, len(VOCAB), (4, 23)).astype(np.int64)
    (logits,) = sess.run(["logits"], {"tokens": ids, **_zero_states(sess, 4)})
    with torch.no_grad():
        x = torch.from_numpy(ids if batch_first else ids.T.copy())
        ref = model(x)[0].numpy()
    ref = ref if batch_first else ref.transpose(1, 0, 2)
    assert np.max(np.abs(logits - ref)) <= 1e-5
    states = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("state_in_")}
    want = {"state_in_h": ["batch", 2, 16]} | ({"state_in_c": ["batch", 2, 16]} if kind == "lstm" else {})
    assert states == want
    meta = result.proto.metadata_props
    props = {p.key: p.value for p in meta}
    assert props["rnnserve.family"] == kind and props["rnnserve.task"] == "token"
    assert json.loads(props["rnnserve.vocabulary"]) == VOCAB


def test_numeric_chain_with_two_recurrent_layers():
    torch.manual_seed(1)
    model = NumericModel().eval()
    result = export_module(model, progress=False)
    assert result.report.ok, result.report.format()
    assert result.layers[:4] == ("pre.0", "pre.1", "pre.2", "pre.3") and "rnn2" in result.layers
    sess = _ort(result.proto)
    assert {i.name for i in sess.get_inputs()} == {"x", "state_in_rnn1_h", "state_in_rnn2_h"}
    x = np.random.default_rng(2).standard_normal((3, 17, 3)).astype(np.float32)
    (y,) = sess.run(["y"], {"x": x, **_zero_states(sess, 3)})
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(1, 0, 2).copy())).numpy().transpose(1, 0, 2)
    assert y.shape == (3, 17, 2) and np.max(np.abs(y - ref)) <= 1e-5
    props = {p.key: p.value for p in result.proto.metadata_props}
    assert props["rnnserve.family"] == "gru+rnn" and props["rnnserve.task"] == "numeric"
    assert "rnnserve.vocabulary" not in props


def test_bare_recurrent_module_and_explicit_layers():
    torch.manual_seed(2)
    bare = nn.LSTM(4, 5, batch_first=True).eval()
    assert export_module(bare, progress=False).report.ok
    model = TokenModel(nn.GRU).eval()
    result = export_module(model, layers=["embed", "rnn", "head"], progress=False)
    assert result.report.ok and result.layers == ("embed", "rnn", "head")


def test_train_mode_without_dropout_exports_and_keeps_the_mode():
    model = TokenModel(nn.GRU)  # train mode, but nothing in it behaves differently
    assert export_module(model, progress=False).report.ok
    assert model.training and model.rnn.training


class _Last(TokenModel):
    def forward(self, x, state=None):
        y, _ = self.rnn(self.embed(x), state)
        return self.head(y[:, -1])  # many-to-one: not a per-step chain


class _Reordered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 16)  # registered first, applied last
        self.rnn = nn.GRU(16, 16, batch_first=True)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 1)
        self.rnn = nn.GRU(3, 4, batch_first=True)


class _MixedLayout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.GRU(3, 4, batch_first=True)
        self.b = nn.GRU(4, 4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TokenModel(nn.LSTM, bidirectional=True).eval(), "rnn: bidirectional LSTM cannot stream"),
        (lambda: TokenModel(nn.LSTM, proj_size=4).eval(), "proj_size=4 is not supported"),
        (lambda: TokenModel(nn.GRU, dropout=0.2).train(), "active in train mode; call model.eval()"),
        (lambda: NumericModel().train(), "pre.3: dropout p=0.3 is active in train mode"),
        (lambda: _Conv().eval(), "conv: layer type Conv1d is not supported"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Embedding(5, 4), nn.GRU(4, 4)), "must be the first layer"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "no nn.RNN, nn.LSTM or nn.GRU"),
        (lambda: _MixedLayout(), "disagree on batch_first"),
        (lambda: nn.Sequential(nn.Linear(3, 5), nn.GRU(4, 4)), "1 expects 4 features but 0 gives 5"),
        (lambda: nn.Sequential(nn.GRU(3, 4), nn.GELU(approximate="tanh")), "only the exact form"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.GRU(3, 4)), "max_norm"),
    ],
)
def test_unsupported_modules_are_refused_with_the_reason(make, message):
    with pytest.raises(UnsupportedModule, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_module(make(), progress=False)


def test_vocabulary_must_match_the_embedding():
    with pytest.raises(UnsupportedModule, match="vocabulary has 3 entries but the embedding has 12"):
        export_module(TokenModel(nn.GRU).eval(), vocabulary=["a", "b", "c"], progress=False)


@pytest.mark.parametrize("model", [_Last(nn.GRU), _Reordered()], ids=["many-to-one", "reordered"])
def test_forward_that_is_not_the_chain_fails_and_writes_nothing(model, tmp_path):
    with pytest.raises(ExportError, match="FAIL  the module's forward"):
        export_module(model.eval(), tmp_path, "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_wrong_weight_translation_fails_verification(monkeypatch, tmp_path):
    real = tm.lstm_onnx_weights

    def swapped(*a, **kw):
        W, R, B, P = real(*a, **kw)
        H = R.shape[2]
        swap = np.r_[H : 2 * H, 0:H, 2 * H : 4 * H]  # gates i and o exchanged
        return W[:, swap], R[:, swap], B, P

    monkeypatch.setattr(tm, "lstm_onnx_weights", swapped)
    with pytest.raises(ExportError, match="FAIL  ORT == PyTorch"):
        export_module(TokenModel(nn.LSTM).eval(), tmp_path, "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_repository_versions_metadata_and_contract(tmp_path):
    model = TokenModel(nn.LSTM).eval()
    first = export_module(model, tmp_path, "mine", vocabulary=VOCAB, description="my model", progress=False)
    second = export_module(model, tmp_path, "mine", vocabulary=VOCAB, progress=False)
    assert first.path == tmp_path / "mine" / "1" / "model.onnx"
    assert second.path == tmp_path / "mine" / "2" / "model.onnx"
    assert (tmp_path / "mine" / "config.yaml").exists()
    assert "PASS  ORT == PyTorch" in (tmp_path / "mine" / "1" / "verification.txt").read_text()
    meta = ort.InferenceSession(str(first.path)).get_modelmeta().custom_metadata_map
    assert meta["rnnserve.description"] == "my model"
    assert [d["path"] for d in json.loads(meta["rnnserve.layers"])] == ["embed", "rnn", "head"]
    assert check_contract(first.path).ok


USER_FILE = """
import torch
from torch import nn

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.rnn = nn.GRU(8, 16, num_layers=2, batch_first=True, bidirectional=BIDIRECTIONAL)
        self.head = nn.Linear(16 * (2 if BIDIRECTIONAL else 1), 12)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])

def build():
    return Tagger()
"""


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cli(tmp_path, bidirectional):
    src = tmp_path / "user_model.py"
    src.write_text(USER_FILE.replace("BIDIRECTIONAL", str(bidirectional)))
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    cmd = [
        sys.executable,
        "-m",
        "export.torch_module",
        f"{src}:build",
        "--repository",
        str(tmp_path / "repo"),
    ]
    cmd += ["--name", "tagger", "--vocabulary", str(tmp_path / "vocab.json")]
    if not bidirectional:
        torch.manual_seed(3)
        sys.path.insert(0, str(tmp_path))
        try:
            import user_model  # noqa: PLC0415 - the file the test just wrote
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("user_model", None)
        torch.save(user_model.build().state_dict(), tmp_path / "weights.pt")
        cmd += ["--state-dict", str(tmp_path / "weights.pt")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    if bidirectional:
        assert res.returncode == 2
        assert "rnn: bidirectional GRU cannot stream" in res.stderr
        assert not (tmp_path / "repo").exists()
        return
    assert res.returncode == 0, res.stderr
    assert "layers: embed -> rnn -> head" in res.stdout
    path = tmp_path / "repo" / "tagger" / "1" / "model.onnx"
    assert path.exists() and check_contract(path).ok
    weights = torch.load(tmp_path / "weights.pt")
    init = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    emb = next(v for k, v in init.items() if k.startswith("embed_0_weight"))
    assert np.array_equal(onnx.numpy_helper.to_array(emb), weights["embed.weight"].numpy())


def test_every_per_step_layer_type():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 6),
        nn.Sigmoid(),
        nn.Linear(6, 6),
        nn.LeakyReLU(0.2),
        nn.GRU(6, 5, batch_first=True),
        nn.ELU(0.7),
        nn.Identity(),
        nn.Tanh(),
        nn.Linear(5, 4, bias=False),
        nn.Softmax(dim=-1),
    ).eval()
    result = export_module(model, check_forward_pass=False, progress=False)  # nn.GRU returns a tuple
    assert result.report.ok, result.report.format()


def test_single_file_output_and_input_width_from_layernorm(tmp_path):
    model = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 4), nn.GRU(4, 5, batch_first=True)).eval()
    result = export_module(
        model, output=tmp_path / "out" / "m.onnx", check_forward_pass=False, progress=False
    )
    assert result.path == tmp_path / "out" / "m.onnx" and check_contract(result.path).ok
    assert "PASS" in (tmp_path / "out" / "m.onnx.verification.txt").read_text()
    x = onnx.load(str(result.path)).graph.input[0]
    assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == ["batch", "time", 3]
