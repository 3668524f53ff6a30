"""Whether a model version is served: one intake rule, for the repository and for the exporter's checker.

`admit` reads an ONNX Runtime session against the state contract (`service.core.contract.read_session`) and
runs the load-time self-check (`service.core.selfcheck`) unless the model's config.yaml turns it off. The
server's repository (`service.core.registry`) serves exactly the versions it admits; ``python -m
export.contract`` runs it first, so a model the checker passes is a model the server serves, and the other
way round. `read_config` reads `<model>/config.yaml` for both. numpy, onnxruntime and yaml only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from service.core.contract import read_session
from service.core.controls import control_feeds
from service.core.selfcheck import probe_of_spec, self_check
from service.core.types import ContractError, ModelConfig, ModelSpec


@dataclass(frozen=True, slots=True)
class Admission:
    """A model version the server serves: its spec, and what its self-check said (one line)."""

    spec: ModelSpec
    check: str


def read_config(model_dir: Path, settings: Settings) -> ModelConfig:
    """Read the model's serving settings: server defaults, then `<model>/config.yaml` (ContractError)."""
    cfg_file = Path(model_dir) / "config.yaml"
    try:
        overrides = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
    except yaml.YAMLError as exc:
        raise ContractError(f"config.yaml is not valid YAML: {exc}") from None
    if overrides is not None and not isinstance(overrides, dict):
        raise ContractError("config.yaml must hold a mapping")
    return ModelConfig.from_settings(settings, overrides)


def admit(session: Any, name: str, version: int, config: ModelConfig, path: Path) -> Admission:
    """Read `session` against the contract and self-check it; raises `ContractError` with the reason."""
    spec = read_session(session, name, version, config, path)
    if not config.self_check:
        return Admission(spec, "off (self_check: false)")
    verdict = self_check(session, probe_of_spec(spec, control_feeds(spec)), tol=config.self_check_tolerance)
    if not verdict.ok:
        raise ContractError(f"self-check failed: {verdict.reason}")
    return Admission(spec, verdict.reason)
