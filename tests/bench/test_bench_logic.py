"""The benchmark's own logic: reference model contract, histogram deltas, perf_analyzer CSV, message sizes,
output folders and the target verdicts (no servers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2

from tests.bench.__main__ import FULL_OUT, FULL_PAGE, QUICK_OUT, outputs
from tests.bench.kserve_drivers import infer_request, kserve_message_sizes
from tests.bench.kserve_echo import answer as echo_answer
from tests.bench.kserve_echo import request_id, split_response
from tests.bench.loadgen import LoadSpec, _split
from tests.bench.perf_analyzer import command, parse_csv
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.report import verdict_table
from tests.bench.servers import BatchHistogram
from tests.bench.suite import (
    BIDI_ECHO,
    KSERVE_STREAM,
    PA_ECHO_STREAM,
    PA_ECHO_UNARY,
    PA_STREAM,
    PA_UNARY,
    REF_MODEL,
    STREAM,
    STREAM_MANY,
    UNARY_ECHO,
    LoadRow,
    Plan,
    SuiteResult,
    paced_name,
)
from tests.bench.targets import verdicts


def test_reference_lstm_follows_the_state_contract_and_streams_exactly(tmp_path):
    cfg = RefModelConfig(features=8, hidden=16)
    path = write_reference_repository(tmp_path, cfg)
    assert path == tmp_path / "ref_lstm" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins == {"x": ["batch", "time", 8], "state_in_h": ["batch", 2, 16], "state_in_c": ["batch", 2, 16]}
    assert [o.name for o in sess.get_outputs()] == ["y", "state_out_h", "state_out_c"]
    x = np.random.default_rng(1).standard_normal((3, 9, 8)).astype(np.float32)
    zero = np.zeros((3, 2, 16), np.float32)
    y, h, c = sess.run(None, {"x": x, "state_in_h": zero, "state_in_c": zero})
    y1, h1, c1 = sess.run(None, {"x": x[:, :4], "state_in_h": zero, "state_in_c": zero})
    y2, h2, c2 = sess.run(None, {"x": x[:, 4:], "state_in_h": h1, "state_in_c": c1})
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, atol=1e-5)
    np.testing.assert_allclose(h2, h, atol=1e-5)
    assert not np.allclose(h, 0)
    assert cfg.state_bytes == 2 * 2 * 16 * 4


def test_batch_histogram_delta_mean_and_quantile():
    before = BatchHistogram(((1.0, 10.0), (32.0, 10.0), (64.0, 10.0), (math.inf, 10.0)), 10.0, 10.0)
    after = BatchHistogram(((1.0, 10.0), (32.0, 40.0), (64.0, 50.0), (math.inf, 50.0)), 10.0 + 1000.0, 50.0)
    d = after.minus(before)
    assert d.count == 40 and d.mean == 25.0
    assert d.quantile(0.5) == 32.0 and d.quantile(0.99) == 64.0


def test_split_spreads_streams_evenly():
    assert _split(10, 3) == [4, 3, 3] and sum(_split(512, 2)) == 512


# perf_analyzer 2.41's `-f` output, as written for `--percentile 99` at one concurrency level.
PA_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "64,1564.4,5,35552,0,36,4990,19,1,34680,64635,75714,142756\n"
)


def test_perf_analyzer_csv_is_parsed_by_column_name():
    (row,) = parse_csv(PA_CSV)
    assert row.concurrency == 64 and row.throughput == 1564.4
    assert (row.p50_us, row.p90_us, row.p95_us, row.p99_us) == (34680, 64635, 75714, 142756)
    assert row.avg_us == 5 + 35552 + 0 + 36 + 4990 + 19 + 1
    # Columns in another order, an extra column, two concurrency levels, a trailing blank line.
    other = (
        "p99 latency,Extra,Inferences/Second,p50 latency,Concurrency\n"
        "900,x,1000.5,700,1\n1800,y,2000,1400,2\n\n"
    )
    rows = parse_csv(other)
    assert [(r.concurrency, r.throughput, r.p50_us, r.p99_us) for r in rows] == [
        (1, 1000.5, 700, 900),
        (2, 2000, 1400, 1800),
    ]
    assert math.isnan(rows[0].p95_us) and math.isnan(rows[0].avg_us)


def test_perf_analyzer_csv_without_the_needed_columns_is_refused():
    with pytest.raises(ValueError, match="p99 latency"):
        parse_csv("Concurrency,Inferences/Second,p50 latency\n1,10,5\n")
    with pytest.raises(ValueError, match="empty"):
        parse_csv("\n")


def test_perf_analyzer_command_drives_one_step_sequences(tmp_path):
    args = command(
        tmp_path / "perf_analyzer",
        "127.0.0.1:1234",
        "ref_lstm",
        64,
        streaming=True,
        shape="x:1,32",
        interval_ms=3000,
        csv_path=tmp_path / "o.csv",
    )
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["-i"] == "grpc" and flags["-u"] == "127.0.0.1:1234" and flags["-m"] == "ref_lstm"
    assert flags["--sequence-length"] == "100000" and flags["--concurrency-range"] == "64"
    assert flags["--shape"] == "x:1,32" and flags["-f"] == str(tmp_path / "o.csv")
    # Three windows, never failed for instability (a shared machine's windows differ a lot).
    assert flags["--max-trials"] == "3" and float(flags["--stability-percentage"]) >= 100_000
    assert args[-1] == "--streaming"
    unary = command(
        tmp_path / "pa", "a:1", "m", 1, streaming=False, shape="x:1,32", interval_ms=1000, csv_path=tmp_path
    )
    assert "--streaming" not in unary


def test_kserve_step_request_and_sizes():
    spec = LoadSpec("kserve_stream", "", 1, 1, 0.0, 1.0, model=REF_MODEL, input_tail=(32,))
    req = infer_request(spec, sequence_id=77)
    assert req.model_name == REF_MODEL and req.parameters["sequence_id"].int64_param == 77
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", "FP32", [1, 1, 32])
    assert len(req.raw_input_contents[0]) == 32 * 4
    req_bytes, resp_bytes = kserve_message_sizes(spec, ("y", "float32", (32,)))
    # Sized for a random 7-byte id, as the driver draws them (an int64 varint of 8 bytes).
    assert req_bytes == infer_request(spec, sequence_id=2**55).ByteSize() > req.ByteSize() > 32 * 4
    resp = service_pb2.ModelInferResponse()
    assert resp_bytes > 32 * 4 and resp.ByteSize() == 0


def test_quick_runs_write_to_their_own_folder():
    assert outputs(False, None, None) == (FULL_OUT, FULL_PAGE)
    out, page = outputs(True, None, None)
    assert out == QUICK_OUT and page.parent == QUICK_OUT
    assert QUICK_OUT != FULL_OUT and FULL_PAGE.parent not in (QUICK_OUT, out)
    # Re-rendering a quick run's JSON stays in its folder; any other folder keeps its own page.
    assert outputs(False, None, None, QUICK_OUT / "results.json") == (QUICK_OUT, QUICK_OUT / "performance.md")
    assert outputs(False, Path("/tmp/x"), None) == (Path("/tmp/x"), Path("/tmp/x/performance.md"))
    assert outputs(False, None, None, FULL_OUT / "results.json") == (FULL_OUT, FULL_PAGE)
    ignored = Path(__file__).resolve().parents[2] / ".gitignore"
    assert f"{QUICK_OUT.as_posix()}/" in ignored.read_text().splitlines()


def _row(system, sessions, steps_per_s, *, steps=1, streams=None, **kw):
    return LoadRow(
        REF_MODEL,
        system,
        streams or sessions,
        sessions,
        steps,
        steps_per_s,
        steps_per_s / steps,
        kw.pop("p50", 1.0),
        2.0,
        kw.pop("p99", 3.0),
        0.5,
        0.8,
        kw.pop("us", 100.0),
        **kw,
    )


def _result() -> SuiteResult:
    plan = Plan.make(quick=True)
    res = SuiteResult(plan, {"mode": "quick", "cpus": 2, "load_average_1m_at_start": 0.1})
    n = plan.reference_streams
    res.loads = [
        _row(BIDI_ECHO, n, 20_000.0, us=45.0),
        _row(UNARY_ECHO, n, 5_000.0, us=200.0),
        _row(STREAM, n, 17_000.0, us=60.0),  # 0.85 of the echo, CPU 1.33x: both met
        _row(KSERVE_STREAM, n, 10_000.0, us=90.0),  # 0.5, CPU 2x: both missed
        _row(PA_ECHO_STREAM, n, 20_000.0, us=45.0),
        _row(PA_STREAM, n, 16_000.0, us=67.5),  # 0.8 exactly, CPU exactly 1.5x: met (bounds inclusive)
        _row(PA_ECHO_UNARY, n, 8_000.0, us=100.0),
        _row(PA_UNARY, n, 4_000.0, us=400.0),  # 0.8 of the unary echo, CPU 2x; 0.5 and 4x the KServe echo's
        _row(STREAM_MANY, n, 30_000.0, streams=2, us=40.0),
        _row(BIDI_ECHO, 1, 4_000.0, p50=0.25),
        _row(UNARY_ECHO, 1, 2_000.0, p50=0.5),
        _row(STREAM, 1, 1_500.0, p50=0.3),  # 1.2x: met
        _row(KSERVE_STREAM, 1, 1_000.0, p50=0.4),  # 1.6x: missed
        _row(PA_UNARY, 1, 900.0, p50=1.0),  # 2x; and 900 steps/s < 1,000: missed
        _row(
            STREAM,
            64,
            50_000.0,
            steps=16,
            ceiling_steps_per_s=100_000.0,
            ceiling_steps_per_cpu_s=70_000.0,
            ceiling_batch=32,
            batch_mean=32.0,
        ),
        _row(paced_name(STREAM, 0.5), n, 8_000.0, rate_per_s=8_500.0, p99=4.0),
        _row(paced_name(KSERVE_STREAM, 0.5), n, 5_000.0, rate_per_s=5_000.0, p99=12.0),
        _row(paced_name(STREAM, 0.25), n, 4_000.0, rate_per_s=4_250.0, p99=40.0),  # not a target
    ]
    res.positions = [
        {"model": REF_MODEL, "position": 1, "stream_ms": 0.5, "stateless_ms": 0.6, "ort_stateless_ms": 0.1},
        {
            "model": REF_MODEL,
            "position": 1000,
            "stream_ms": 0.54,
            "stateless_ms": 60.0,
            "ort_stateless_ms": 30.0,
        },
    ]
    res.memory = [
        {
            "state": "written",
            "sessions": 1000,
            "rss_per_session_bytes": 5000.0,
            "raw_state_bytes_per_session": 4096,
            "ratio": 5000 / 4096,
        }
    ]
    return res


def test_verdicts_hold_each_path_against_the_echo_of_its_kind():
    res = _result()
    vs = verdicts(res)
    n = res.plan.reference_streams

    def check(target, ratio, met):
        (v,) = [v for v in vs if v.target.startswith(target)]
        assert math.isclose(v.ratio, ratio, rel_tol=1e-9), (target, v)
        assert v.met is met, (target, v)

    check(f"msgs/s @{n}: {STREAM} / {BIDI_ECHO}", 0.85, True)
    check(f"msgs/s @{n}: {KSERVE_STREAM} / {BIDI_ECHO}", 0.5, False)
    check(f"msgs/s @{n}: {PA_STREAM} / {PA_ECHO_STREAM}", 0.8, True)
    check(f"msgs/s @{n}: {PA_UNARY} / {UNARY_ECHO}", 0.8, True)
    check(f"msgs/s @{n}: {PA_UNARY} / {PA_ECHO_UNARY}", 0.5, False)
    check(f"server CPU per one-step message @{n}: {STREAM} / {BIDI_ECHO}", 60 / 45, True)
    check(f"server CPU per one-step message @{n}: {KSERVE_STREAM} / {BIDI_ECHO}", 2.0, False)
    check(f"server CPU per one-step message @{n}: {PA_STREAM} / {PA_ECHO_STREAM}", 1.5, True)
    check(f"server CPU per one-step message @{n}: {PA_UNARY} / {UNARY_ECHO}", 2.0, False)
    check(f"server CPU per one-step message @{n}: {PA_UNARY} / {PA_ECHO_UNARY}", 4.0, False)
    check(f"p50 @1 stream: {STREAM} / {BIDI_ECHO}", 1.2, True)
    check(f"p50 @1 stream: {KSERVE_STREAM} / {BIDI_ECHO}", 1.6, False)
    check(f"p50 @1 stream: {PA_UNARY} / {UNARY_ECHO}", 2.0, False)
    check("one sequence over KServe unary", 900.0, False)
    check(f"p99 at 50% of peak: {STREAM} (8,500 steps/s offered", 4.0, True)
    check(f"p99 at 50% of peak: {KSERVE_STREAM} (", 12.0, False)
    check("16-step chunks @64 sessions: Stream / raw ORT (1 intra-op", 0.5, False)
    check("latency flat in position: pos 1000 / pos 1", 1.08, True)
    check("stateless recompute / streamed step @ pos 1000", 60 / 0.54, True)
    check("idle memory @ 1,000 sessions / raw state bytes", 5000 / 4096, True)
    # Only the 50% paced runs are targets; StreamMany has no paced run here, so no row.
    assert sum(v.target.startswith("p99 at 50% of peak") for v in vs) == 2


def test_missing_measurements_give_no_row_or_na_and_the_table_says_so():
    res = _result()
    res.loads = [r for r in res.loads if r.system != UNARY_ECHO]
    res.loads.append(_row(UNARY_ECHO, res.plan.reference_streams, 5_000.0, us=float("nan")))
    vs = verdicts(res)
    cpu = next(v for v in vs if v.target.startswith("server CPU") and "unary echo" in v.target)
    assert cpu.met is None and math.isnan(cpu.ratio)
    assert not any(v.target.startswith("p50 @1 stream: KServe unary") for v in vs)
    table = verdict_table(vs)
    assert "| n/a |" in table and "**missed**" in table and "**met**" in table


def test_kserve_echo_copies_the_request_id_into_the_captured_answer():
    answer = service_pb2.ModelInferResponse(model_name=REF_MODEL, model_version="1")
    out = answer.outputs.add()
    out.name, out.datatype = "y", "FP32"
    out.shape.extend([1, 1, 32])
    answer.raw_output_contents.append(bytes(128))
    answer.parameters["sequence_id"].int64_param = 5
    head, tail = split_response(answer.SerializeToString())
    assert head + tail == answer.SerializeToString()
    spec = LoadSpec("kserve_stream", "", 1, 1, 0.0, 1.0, model=REF_MODEL, input_tail=(32,))
    for rid in ("", "7", "x" * 300):  # none, short, and an id whose length takes two varint bytes
        req = infer_request(spec, sequence_id=99)
        req.id = rid
        assert request_id(req.SerializeToString()) == rid.encode()
        got = service_pb2.ModelInferResponse.FromString(echo_answer(head, tail, req.SerializeToString()))
        expected = service_pb2.ModelInferResponse()
        expected.CopyFrom(answer)
        expected.id = rid
        assert got == expected
    assert request_id(b"") == b""
