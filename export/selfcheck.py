"""Load-time self-check of an ONNX file: the server's own check (`service.core.selfcheck`) on its contract.

One implementation: the server runs `service.core.selfcheck.self_check` on every model version before it
serves it; this module feeds it the contract view of an ONNX file (``export.contract.read_contract``), so a
model can be checked before it is copied into a repository. Torch-free (numpy, onnx, the contract reader).

    verdict = self_check(session, read_contract(onnx.load(path)))
    if not verdict.ok: print(verdict.reason)
"""

from __future__ import annotations

from export.contract import TIME, ContractSpec, initial_state_row
from service.core.selfcheck import DEFAULT_STEPS, DEFAULT_TOL, Probe, ProbeTensor, Runner, Verdict
from service.core.selfcheck import self_check as _self_check

__all__ = ["DEFAULT_STEPS", "DEFAULT_TOL", "Runner", "Verdict", "probe_of_contract", "self_check"]


def probe_of_contract(spec: ContractSpec) -> Probe:
    """Read what the self-check needs off the contract view of an ONNX file."""

    def dims(shape: tuple[int | str | None, ...]) -> tuple[int | None, ...]:
        return tuple(d if isinstance(d, int) else None for d in shape[1:])

    vocab = spec.vocabulary
    return Probe(
        inputs=tuple(
            ProbeTensor(t.name, t.dtype, dims(t.shape), len(t.shape) > 1 and t.shape[1] == TIME)
            for t in spec.data_inputs
        ),
        outputs=tuple(t.name for t in spec.data_outputs),
        states=tuple(
            ProbeTensor(s.name, s.dtype, dims(s.shape), False, initial_state_row(spec.metadata, s.name))
            for s in spec.states
        ),
        time_axis=spec.time_axis,
        vocab_size=len(vocab) if vocab else None,
        problems=spec.problems,
    )


def self_check(
    runner: Runner,
    spec: ContractSpec,
    *,
    tol: float = DEFAULT_TOL,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> Verdict:
    """`service.core.selfcheck.self_check` on the contract view of an ONNX file; never raises."""
    return _self_check(runner, probe_of_contract(spec), tol=tol, steps=steps, seed=seed)
