"""What a Triton client reads the same as from Triton: unknown-model wording, served versions, statistics.

Compared with Triton core (src/model_repository_manager/model_repository_manager.cc and model_lifecycle.cc;
docs/triton.md, "Fidelity"):

- an unknown name: "Request for unknown model: '<name>' is not found"; a known name without that version:
  "Request for unknown model: '<name>' version <v> is not found"; a known name with no version ready:
  "Request for unknown model: '<name>' has no available versions". Here a refused version's reason follows
  in parentheses, and the status is NOT_FOUND;
- ModelMetadata.versions: the versions that are READY (served, or retired and still serving the sessions
  pinned to them), not every directory on disk;
- ModelStatistics: one entry per version, every version when the request names none; a version that leaves
  the served set keeps its entry (its counts are cumulative, as the Prometheus counters are).
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2 as pb

from service.core.engine import Engine, ModelSpec
from service.errors import NotFound
from service.server.kserve_models import ModelStats, model_metadata

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def unknown_model(engine: Engine, name: str, version: int | None, detail: str = "") -> NotFound:
    """Triton's NOT_FOUND for a model name or version that is not served (see module docstring).

    For a known model, `detail` (the repository's own message: served versions, policy, refusal) or else
    the refusal reason follows in parentheses; an unknown name gets Triton's sentence alone.
    """
    served = any(s.name == name for s in engine.served_versions())
    refused = [r for r in engine.refusals() if r.name == name]
    if not served and not refused:
        return NotFound(f"Request for unknown model: '{name}' is not found", reason="unknown")
    if version:
        message = f"Request for unknown model: '{name}' version {version} is not found"
        refused = [r for r in refused if r.version == version]
    else:
        message = f"Request for unknown model: '{name}' has no available versions"
    if detail:
        message += f" ({detail})"
    elif refused:
        message += f" (version {refused[-1].version} was refused at load: {refused[-1].reason})"
    return NotFound(message, reason="unknown")


def get_model(engine: Engine, name: str, version: int | None) -> ModelSpec:
    """`Engine.get_model`, its NOT_FOUND worded as Triton words it."""
    try:
        return engine.get_model(name, version)
    except NotFound as exc:
        if exc.reason != "unknown":
            raise
        raise unknown_model(engine, name, version, exc.message if version else "") from None


def ready_versions(engine: Engine, spec: ModelSpec) -> list[int]:
    """Return the versions of `spec`'s model that answer requests now: served, or retired but still loaded.

    A retired version stays loaded while sessions (KServe sequences) are pinned to it and answers their
    requests, as a Triton version stays READY until it unloads.
    """
    loaded = {mv.spec.version for mv in engine.models.repository.loaded() if mv.spec.name == spec.name}
    return sorted(loaded | {spec.version})


def metadata(engine: Engine, name: str, version: int | None) -> pb.ModelMetadataResponse:
    """ModelMetadata with `versions` listing only the versions that are ready."""
    spec = get_model(engine, name, version)
    response = model_metadata(spec)
    del response.versions[:]
    response.versions.extend(str(v) for v in ready_versions(engine, spec))
    return response


def statistics(
    engine: Engine, stats: dict[tuple[str, int], ModelStats], name: str, version: int | None
) -> pb.ModelStatisticsResponse:
    """ModelStatistics: every version served or with counts, of one model (or all), one version if named."""
    keys = {(s.name, s.version) for s in engine.served_versions()} | set(stats)
    if name:
        if version:
            if (name, version) not in keys:
                get_model(engine, name, version)  # raises Triton's NOT_FOUND (or finds a pinned version)
            keys = {(name, version)}
        else:
            keys = {k for k in keys if k[0] == name}
            if not keys:
                raise unknown_model(engine, name, None)
    response = pb.ModelStatisticsResponse()
    for key in sorted(keys):
        st = stats.get(key, ModelStats())
        entry: Any = response.model_stats.add(
            name=key[0],
            version=str(key[1]),
            last_inference=st.last_inference_ms,
            inference_count=st.inference_count,
            execution_count=st.execution_count,
        )
        for phase in PHASES:
            duration = getattr(st, phase)
            target = getattr(entry.inference_stats, phase)
            target.count, target.ns = duration.count, duration.ns
    return response
