"""Sampling and prime encoding (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidArgument
from service.generation import check_ids, encode_text, sample


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
