"""KServe sequences apply their requests in arrival order, also when a request reaches a busy session.

The real engine and sequence table on the `simple_dyna_sequence` fixture (a running sum: any reordering
changes the outputs). The interleaving that once reordered a sequence is made deterministic: a request arrives
right after step 1 completes, before the step the engine had deferred (it arrived while step 1 ran) runs.
"""

from __future__ import annotations

import asyncio

import fixtures
import numpy as np
from prometheus_client import CollectorRegistry
from server_thread import make_settings

from service.core.engine import Engine
from service.server.kserve_convert import SequenceControl
from service.server.kserve_sequences import SequenceTable


def _row(value: int) -> dict[str, np.ndarray]:
    return {"INPUT": np.array([value], np.int32)}


def _output(outcome) -> int:  # type: ignore[no-untyped-def]
    return int(outcome.outputs["OUTPUT"][0])


def test_a_request_arriving_as_a_step_completes_never_overtakes_the_deferred_one(tmp_path):
    fixtures.dyna_sequence(tmp_path, "dyna")

    async def scenario() -> list[int]:
        engine = Engine(make_settings(tmp_path), registry=CollectorRegistry())
        await engine.start()
        try:
            table = SequenceTable(engine)
            middle = SequenceControl(5, False, False)
            first = await table.step("dyna", None, SequenceControl(5, True, False), _row(1))
            calls = [table.submit("dyna", None, middle, _row(10))]  # queued at once
            calls.append(table.submit("dyna", None, middle, _row(100)))  # the session is busy: deferred
            original = engine.stepper.finish

            def finish(req, outputs, exc) -> None:  # type: ignore[no-untyped-def]
                original(req, outputs, exc)
                if len(calls) == 2:  # arrives now, before the deferred step has run
                    calls.append(table.submit("dyna", None, middle, _row(1000)))

            engine.stepper.finish = finish  # type: ignore[method-assign]
            await asyncio.wait([calls[0][0]])
            outs = [_output(read(await asyncio.wait_for(fut, 10) and fut)) for fut, read in calls]
            return [_output(first), *outs]
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == [1, 11, 111, 1111]
