"""`rnnserve`: command-line client of the native API.

    rnnserve models                                   list served models
    rnnserve stream --model M --text FILE [--chunk N] token model: top next token after every input token
    rnnserve stream --model M --csv FILE [--chunk N]  numeric model: predicted values for every row
    rnnserve generate --prime "X:1" --tokens 400      sample from a token model (default model: "default")
    rnnserve session SESSION_ID                       show a session
    rnnserve reload                                   rescan the repository now; served and refused versions
    rnnserve health [MODEL]                           SERVING or NOT_SERVING (and why a model is not served)

`--address host:port[,host:port...]` (default localhost:8001) picks the server(s), failing over in order.
`--api-key` (or $RNNSERVE_API_KEY) authenticates; `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key` (or
$RNNSERVE_TLS, $RNNSERVE_TLS_CA, ...) connect over TLS, with a client certificate for mutual TLS.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np

from service import __version__
from service.client.security import Credentials
from service.client.sync import Client, ModelInfo, default_address
from service.proto import rnnserve_pb2 as pb


def _shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    """Print every served model."""
    models = client.list_models()
    if args.json:
        print(json.dumps([_model_json(m) for m in models], indent=2))
        return 0
    for m in models:
        task = m.metadata.get("rnnserve.task", "")
        family = m.metadata.get("rnnserve.family", "")
        print(
            f"{m.name}  v{m.version} (versions {', '.join(map(str, m.versions))})  {family} {task}".rstrip()
        )
        if m.description:
            print(f"  {m.description}")
        for kind, specs in (("in", m.inputs), ("out", m.outputs), ("state", m.states)):
            for t in specs:
                print(f"  {kind:5s} {t.name}: {t.dtype.name} {_shape(t.shape)}")
        if m.vocabulary:
            print(f"  vocabulary: {len(m.vocabulary)} tokens")
    return 0


def _model_json(m: ModelInfo) -> dict[str, object]:
    d = asdict(m)
    for key in ("inputs", "outputs", "states"):
        d[key] = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in getattr(m, key)]
    return d


def _tokenize(text: str, vocabulary: Sequence[str]) -> list[int]:
    """Greedy longest match over the vocabulary; exits with a message on text it cannot cover."""
    ids = {tok: i for i, tok in enumerate(vocabulary) if tok}
    longest = max((len(t) for t in ids), default=0)
    out: list[int] = []
    i = 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i : i + n] in ids:
                out.append(ids[text[i : i + n]])
                i += n
                break
        else:
            raise SystemExit(f"character {text[i]!r} at position {i} is not in the model's vocabulary")
    return out


def _chunks(values: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _stream_text(client: Client, model: ModelInfo, args: argparse.Namespace) -> int:
    if not model.vocabulary:
        raise SystemExit(f"model {model.name!r} has no vocabulary: use --csv for numeric models")
    tokens = np.asarray(_tokenize(Path(args.text).read_text(), model.vocabulary), dtype=np.int64)
    out_name = "logits" if any(t.name == "logits" for t in model.outputs) else model.outputs[0].name
    vocab = model.vocabulary
    position = 0
    print("step\tinput\tnext\tp")
    with client.session(model.name, model.version) as session:
        for out in session.stream(_chunks(tokens, args.chunk)):
            logits = out[out_name].astype(np.float64)  # (T, V)
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            best = p.argmax(axis=-1)
            for t in range(len(best)):
                tok = tokens[position]
                print(f"{position}\t{vocab[tok]!r}\t{vocab[best[t]]!r}\t{p[t, best[t]]:.3f}")
                position += 1
    return 0


def _read_csv(path: Path, features: int | None) -> np.ndarray:
    rows: list[list[float]] = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                values = [float(c) for c in row]
            except ValueError:
                if not rows:  # a header line
                    continue
                raise SystemExit(f"rnnserve: {path}:{line}: non-numeric value in {row}") from None
            width = features or (len(rows[0]) if rows else len(values))
            if len(values) < width or (not features and len(values) != width):
                raise SystemExit(
                    f"rnnserve: {path}:{line}: {len(values)} values, expected {width} "
                    f"({'the model takes' if features else 'as in the rows before'}; every row needs as many)"
                )
            rows.append(values[-features:] if features else values)
    if not rows:
        raise SystemExit(f"rnnserve: {path}: no numeric rows")
    return np.asarray(rows, dtype=np.float32)


def _stream_csv(client: Client, model: ModelInfo, args: argparse.Namespace) -> int:
    if len(model.inputs) != 1:
        raise SystemExit(f"model {model.name!r} has inputs {[t.name for t in model.inputs]}: one is needed")
    spec = model.inputs[0]
    features = spec.shape[-1] if model.time_axis and len(spec.shape) == 3 else None
    data = _read_csv(Path(args.csv), features).astype(spec.dtype)
    if not model.time_axis:
        raise SystemExit(f"model {model.name!r} has no time axis; stream needs a sequence model")
    writer = csv.writer(sys.stdout)
    names = [t.name for t in model.outputs]
    writer.writerow(["step", *[f"{n}[{i}]" for n in names for i in range(_width(model, n))]])
    position = 0
    with client.session(model.name, model.version) as session:
        for out in session.stream(_chunks(data, args.chunk)):
            first = out[names[0]]
            for t in range(first.shape[0]):
                values = [float(v) for n in names for v in np.ravel(out[n][t])]
                writer.writerow([position, *[f"{v:.6g}" for v in values]])
                position += 1
    return 0


def _width(model: ModelInfo, name: str) -> int:
    spec = next(t for t in model.outputs if t.name == name)
    dims = [d for d in spec.shape[2 if model.time_axis else 1 :]]
    return int(np.prod([d or 1 for d in dims])) if dims else 1


def cmd_stream(client: Client, args: argparse.Namespace) -> int:
    """Stream a text or CSV file through a model, printing the outputs of every step."""
    if args.chunk < 1:
        raise SystemExit("--chunk must be >= 1")
    model = client.get_model(args.model, args.version)
    if args.text:
        return _stream_text(client, model, args)
    return _stream_csv(client, model, args)


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    """Print the prime and then the sampled continuation as it arrives."""
    sys.stdout.write(args.prime)
    for piece in client.generate(
        args.model, args.prime, args.tokens, args.temperature, args.top_k, args.seed, version=args.version
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_session(client: Client, args: argparse.Namespace) -> int:
    """Show one session."""
    info = client.describe_session(args.session_id)
    print(json.dumps(asdict(info), indent=2))
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    """Rescan the repository; print the served models and every refused version with its reason (exit 1)."""
    answer = client.call("ReloadRepository", pb.ReloadRepositoryRequest())
    for m in answer.models:
        print(f"{m.name}  v{m.version}  served")
    for r in answer.refused:
        print(f"{r.name}  v{r.version}  REFUSED: {r.reason}")
    return 1 if answer.refused else 0


def _health_status(client: Client, service: str) -> str:
    # grpc.health.v1 by hand (HealthCheckRequest{service=1}, HealthCheckResponse{status=1}): the client needs
    # no grpcio-health-checking package for two one-field messages.
    name = service.encode()
    request = b"\x0a" + _varint(len(name)) + name if name else b""
    check = client._channel.unary_unary("/grpc.health.v1.Health/Check")
    reply = check(request, timeout=client.timeout)
    code = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0
    return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(code, str(code))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    """Print the health of the server or of one model; for a model not served, the reason the server gives."""
    try:
        status = _health_status(client, args.model or "")
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        status = "SERVICE_UNKNOWN"  # a name the server has never heard of
    print(f"{args.model or 'server'}: {status}")
    if status != "SERVING" and args.model:
        try:
            client.get_model(args.model)
        except grpc.RpcError as err:
            print(f"  {err.details()}")
    return 0 if status == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `rnnserve`."""
    parser = argparse.ArgumentParser(prog="rnnserve", description="Client of the rnnserve native gRPC API.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--address",
        default=default_address(),
        help="host:port[,host:port...] in failover order (default: $RNNSERVE_ADDRESS, else localhost:8001)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    env = os.environ.get
    parser.add_argument("--api-key", default=env("RNNSERVE_API_KEY"), help="API key ($RNNSERVE_API_KEY)")
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=env("RNNSERVE_TLS", "") not in ("", "0", "false", "no"),
        help="connect over TLS (implied by --tls-ca/--tls-cert)",
    )
    parser.add_argument("--tls-ca", default=env("RNNSERVE_TLS_CA"), help="PEM CA that signed the server cert")
    parser.add_argument("--tls-cert", default=env("RNNSERVE_TLS_CERT"), help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env("RNNSERVE_TLS_KEY"), help="PEM key of --tls-cert")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list served models")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "stream", help="stream a text or CSV file through a model and print every step's output"
    )
    p.add_argument("--model", default="default")
    p.add_argument("--version", type=int, default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text file (token models)")
    src.add_argument("--csv", help="CSV file, one row of features per step (numeric models)")
    p.add_argument("--chunk", type=int, default=64, help="timesteps per message")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("generate", help="sample from a token model")
    p.add_argument("--model", default="default")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--prime", default="X:1\n", help='prime text (e.g. "X:1")')
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("session", help="show a session")
    p.add_argument("session_id")
    p.set_defaults(func=cmd_session)

    p = sub.add_parser("reload", help="rescan the model repository now; list served and refused versions")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("health", help="health of the server, or of one model (and why it is not served)")
    p.add_argument("model", nargs="?", default="")
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rnnserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        credentials = Credentials.from_files(
            api_key=args.api_key, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, tls=args.tls
        )
        with Client(args.address, timeout=args.timeout, credentials=credentials) as client:
            return int(args.func(client, args))
    except grpc.RpcError as err:
        print(f"rnnserve: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout went away (| head)
        return 0
    except OSError as err:  # a missing or unreadable --text/--csv file
        where = f"{err.filename}: " if err.filename else ""
        print(f"rnnserve: cannot read {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as err:  # inputs the model does not take (encode_inputs says which)
        print(f"rnnserve: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
