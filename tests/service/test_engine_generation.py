"""Sampling and prime encoding (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.generation import check_ids, encode_text, sample
from service.errors import InvalidArgument


def test_encode_text_longest_match_and_unknown_characters():
    vocab = ["a", "b", "ab", "\n", "c"]
    assert encode_text("abc\na", vocab) == [2, 4, 3, 0]
    with pytest.raises(InvalidArgument, match=r"'X', 'Y'"):
        encode_text("aXbYX", vocab)


def test_sample_greedy_topk_and_seeded():
    logits = np.array([0.1, 3.0, 2.0, -1.0])
    rng = np.random.default_rng(0)
    assert sample(logits, 0.0, 0, rng) == 1
    assert {sample(logits, 5.0, 2, np.random.default_rng(i)) for i in range(200)} == {1, 2}
    a = [sample(logits, 1.0, 0, np.random.default_rng(42)) for _ in range(5)]
    b = [sample(logits, 1.0, 0, np.random.default_rng(42)) for _ in range(5)]
    assert a == b
    counts = np.bincount([sample(logits, 1.0, 0, rng) for _ in range(4000)], minlength=4) / 4000
    probs = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(counts - probs).max() < 0.05


def test_check_ids():
    check_ids([0, 4], 5)
    with pytest.raises(InvalidArgument, match=r"\[5, -1\]"):
        check_ids([5, -1, 2], 5)


def test_bulk_histogram_matches_prometheus_histogram():
    from prometheus_client import CollectorRegistry, Histogram

    from service.metrics import LATENCY_BUCKETS, BulkHistogram

    reg = CollectorRegistry()
    bulk = BulkHistogram("bulk_seconds", "x", ["m"], LATENCY_BUCKETS, reg).labels("a")
    ref = Histogram("ref_seconds", "x", ["m"], buckets=LATENCY_BUCKETS, registry=reg).labels("a")
    values = np.concatenate([np.random.default_rng(0).exponential(0.01, 500), list(LATENCY_BUCKETS)])
    bulk.observe_many(values[:300])
    for v in values[300:]:
        bulk.observe(float(v))
    for v in values:
        ref.observe(float(v))
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        got = reg.get_sample_value(
            "bulk_seconds_bucket", {"m": "a", "le": str(float(le)) if le != "+Inf" else le}
        )
        want = reg.get_sample_value(
            "ref_seconds_bucket", {"m": "a", "le": str(float(le)) if le != "+Inf" else le}
        )
        assert got == want, le
    assert reg.get_sample_value("bulk_seconds_sum", {"m": "a"}) == pytest.approx(
        reg.get_sample_value("ref_seconds_sum", {"m": "a"})
    )
