"""A Redis that runs out of memory (maxmemory, noeviction): what each `store_refused` setting does.

Two engines in this process share a real redis-server. Memory runs out by `CONFIG SET maxmemory 1`: Redis then
answers every write with OOM but still serves reads. Outputs are compared with one ONNX Runtime pass.
"""

from __future__ import annotations

import asyncio
import logging

import fixtures
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.core.engine import Engine
from service.errors import Unavailable
from service.stores.redis import RedisStore

pytestmark = pytest.mark.slow


def _reference(repo, tokens):
    return fixtures.run_whole(repo / "tiny_lstm" / "1" / "model.onnx", {"tokens": tokens[None]})["logits"][0]


def _errors(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("rnnserve_store_errors_total", {"kind": kind}) or 0.0


def _engine(repo, url, mode, registry):
    cfg = Settings(
        model_repository=repo,
        replica_id=f"r-{mode}",
        lease_s=30,
        store="redis",
        redis_url=url,
        store_refused=mode,
        metrics_port=-1,
    )
    return Engine(cfg, registry=registry, store=RedisStore(url, lease_s=30))


@pytest.mark.parametrize("mode", ["refuse", "serve-held"])
def test_redis_out_of_memory(model_repository, clean_redis, caplog, mode):
    tokens = np.random.default_rng(5).integers(0, 39, 24).astype(np.int64)
    want = _reference(model_repository, tokens)
    r = clean_redis.client()
    caplog.set_level(logging.ERROR, logger="service.core.sessions")

    async def main():
        registry = CollectorRegistry()
        engine = _engine(model_repository, clean_redis.url, mode, registry)
        await engine.start()
        outs = []
        try:
            sid = (await engine.create_session("tiny_lstm")).session_id
            outs.append((await engine.step(sid, 1, {"tokens": tokens[0:4]})).outputs["logits"])
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            with pytest.raises(Unavailable, match="refuses writes .out of memory"):
                await engine.create_session("tiny_lstm")  # new sessions are refused in both modes
            if mode == "refuse":
                for _ in range(3):  # the client retries the same seq; nothing unsaved is ever answered
                    with pytest.raises(Unavailable, match="refuses writes"):
                        await engine.step(sid, 2, {"tokens": tokens[4:8]})
                assert _errors(registry, "refused") >= 4
                r.config_set("maxmemory", 0)
                for seq in (2, 3, 4, 5, 6):
                    step = await engine.step(sid, seq, {"tokens": tokens[(seq - 1) * 4 : seq * 4]})
                    outs.append(step.outputs["logits"])
            else:
                for seq in (2, 3, 4):  # held sessions keep being served, their saves refused
                    step = await engine.step(sid, seq, {"tokens": tokens[(seq - 1) * 4 : seq * 4]})
                    outs.append(step.outputs["logits"])
                assert int(r.hget(f"rnnserve:{{{sid}}}:rec", "seq")) == 1  # durability lags ...
                assert registry.get_sample_value("rnnserve_undurable_steps_total") == 3
                r.config_set("maxmemory", 0)
                for seq in (5, 6):
                    step = await engine.step(sid, seq, {"tokens": tokens[(seq - 1) * 4 : seq * 4]})
                    outs.append(step.outputs["logits"])
                assert int(r.hget(f"rnnserve:{{{sid}}}:rec", "seq")) == 6  # ... and catches up
            return np.concatenate(outs)
        finally:
            r.config_set("maxmemory", 0)
            await engine.stop()

    got = asyncio.run(main())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Logged once per interval (10 s by default), naming the cause, however many steps failed.
    lines = [rec.getMessage() for rec in caplog.records if "session store refused" in rec.getMessage()]
    assert len(lines) == 1 and "maxmemory" in lines[0], lines
