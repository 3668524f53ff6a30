"""Shared pytest fixtures: tiny ONNX model repositories built once per test session (no training needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import fixtures  # noqa: E402

# Server subprocesses the tests start (`python -m service.server`, replicas, chaos, benchmarks) run one
# process unless a test asks for workers itself (`--workers N`, tests/service/test_workers.py): their checks
# (one pid per replica, one log, one registry) are about a single server process.
os.environ.setdefault("RNNSERVE_WORKERS", "1")


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    """A read-only repository with one of each fixture model (tests that modify one build their own)."""
    repo = tmp_path_factory.mktemp("repository")
    fixtures.token_lstm(repo, "tiny_lstm")
    fixtures.token_lstm(repo, "tiny_lstm2", layers=2, hidden=6, seed=3)
    fixtures.numeric_gru(repo, "tiny_gru")
    fixtures.accumulator(repo, "accumulator")
    return repo
