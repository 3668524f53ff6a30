"""Server settings: one `Settings` object, loaded from a YAML file, the environment and command-line flags.

Precedence: flags > environment (`RNNSERVE_*`) > file (`--config FILE` or `RNNSERVE_CONFIG`) > defaults. Every
limit and timeout is a field with a safe default. Build it once in `main()` (`load_settings`) and pass it down
explicitly.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import __version__

ENV_PREFIX = "RNNSERVE_"


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """All server settings. Field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    grpc_host: str = Field(
        "",
        description=(
            "Address the gRPC server binds to (default: 0.0.0.0 with authentication on, 127.0.0.1 with"
            " auth none, so an open server is only reachable from this machine unless told otherwise)."
        ),
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port (Triton's default 8001; 0 = pick a free one)."
    )
    metrics_port: int = Field(
        8002,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port (8002 as Triton; 0 = pick free, -1 = off).",
    )
    model_repository: Path = Field(
        Path("models/repository"), description="Model repository: <repo>/<name>/<version>/model.onnx."
    )
    repository_poll_s: float = Field(
        2.0,
        ge=0,
        description="Seconds between repository scans for new, changed or removed versions (0 = off).",
    )
    max_batch_size: int = Field(256, ge=1, description="Most sessions batched into one ONNX Runtime run.")
    max_queue_delay_us: int = Field(
        0, ge=0, description="Extra microseconds a batch waits for more requests (0 = greedy batching only)."
    )
    inline_max_us: int = Field(
        200,
        ge=0,
        description=(
            "Batches whose measured ONNX Runtime CPU cost is at most this many microseconds run on the event"
            " loop instead of the executor thread (0 = never: ORT always runs off the loop). Tiny batches at"
            " light load then skip the thread hand-off, which costs as much as the run."
        ),
    )
    inline_idle_max_us: int = Field(
        1000,
        ge=0,
        description=(
            "As inline_max_us, for a batch that leaves no other step of its model waiting (one sequence at a"
            " time, light load): the hand-off would only add its CPU and latency to those steps. Never below"
            " inline_max_us; inline_max_us 0 turns both off."
        ),
    )
    batch_hold_us: int = Field(
        1000,
        ge=0,
        description=(
            "Longest a batch smaller than batch_target_rows waits for more steps, used only while such waits"
            " have been gathering steps (learnt from the load; 0 = never hold)."
        ),
    )
    batch_target_rows: int = Field(
        16, ge=1, description="Batch size at which holding for more steps stops (ORT's per-row cost is flat)."
    )
    max_queue_size: int = Field(
        65536, ge=1, description="Most requests waiting per model version before new ones are refused."
    )
    max_sessions: int = Field(1_000_000, ge=1, description="Most open sessions on this server.")
    max_sessions_per_model: int = Field(
        1_000_000, ge=1, description="Most open sessions per model (all versions)."
    )
    idle_ttl_s: float = Field(600.0, gt=0, description="Default idle time after which a session expires.")
    max_idle_ttl_s: float = Field(86_400.0, gt=0, description="Largest idle TTL a client may ask for.")
    max_lifetime_s: float = Field(
        86_400.0,
        gt=0,
        description="Longest a session may live, however active (then it expires: 'lifetime').",
    )
    max_chunk_steps: int = Field(4096, ge=1, description="Most timesteps in one chunk.")
    max_request_steps: int = Field(
        65_536,
        ge=1,
        description="Most batch x timesteps one request may ask for (a KServe batch, a StreamMany message).",
    )
    max_rows_per_message: int = Field(
        4096, ge=1, description="Most sessions (rows) in one StepMany / StreamMany message."
    )
    max_cached_response_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest response a session keeps for an idempotent retry; longer chunks are refused.",
    )
    max_stream_buffer_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Bytes of answered but unsent replies one KServe stream may hold for a slow reader; past "
        "it, the stream takes no more requests until the client reads (a larger single reply still goes).",
    )
    max_id_length: int = Field(
        128, ge=8, description="Longest session id or KServe sequence id (characters) accepted."
    )
    slice_steps: int = Field(
        512,
        ge=1,
        description="A stateless request of more batch x timesteps than this runs in time slices of at most "
        "this many batch x timesteps, on a thread of its own (see burst_nice), so that other clients' steps "
        "interleave and its working memory stays one slice's.",
    )
    burst_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness added to the thread that runs sliced stateless requests (Linux), so that "
        "on a busy core the per-step batches and the event loop run before a maximal request's next slice; "
        "0 = the same priority as the rest of the server.",
    )
    trim_after_steps: int = Field(
        16_384,
        ge=0,
        description="A stateless request of at least this many batch x timesteps runs on an ONNX Runtime "
        "session without memory arena, and freed memory goes back to the OS after it (malloc_trim); "
        "0 = never.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, in bytes."
    )
    evict_on_capacity: bool = Field(
        False, description="At capacity, evict the least recently used idle session instead of refusing."
    )
    drain_grace_s: float = Field(
        20.0, ge=0, description="Seconds that in-flight work gets to finish on shutdown."
    )
    ort_intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime intra-op threads per model version (0 = ORT's default)."
    )
    ort_executor_threads: int = Field(
        1, ge=1, description="Threads that run ONNX Runtime calls off the event loop (shared by all models)."
    )
    state_hmac_key: str | None = Field(
        None,
        description="Secret key for HMAC-SHA-256 on GetState blobs (and stored records); give every replica "
        "the same key so a blob moves between them. Unset: a random key per process (blobs only go back to "
        "the replica that made them).",
    )
    allow_unsigned_state: bool = Field(
        False,
        description="SetState also accepts blobs with a plain SHA-256 trailer (anyone can make one: a raw "
        "state import). Off: only blobs signed with this server's key.",
    )
    store: Literal["memory", "redis"] = Field("memory", description="Session store: 'memory' or 'redis'.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL when store = redis.")
    store_flush_every: int = Field(
        1,
        ge=1,
        description="Write a session to the shared store every N applied steps (1 = after every step).",
    )
    store_refused: Literal["refuse", "serve-held"] = Field(
        "refuse",
        description="When the store refuses writes (Redis out of memory, read-only): 'refuse' answers steps "
        "UNAVAILABLE until it takes writes again (nothing unsaved is ever answered); 'serve-held' keeps "
        "stepping the sessions this replica holds, answering before they are saved (durability lags until "
        "the store takes writes; a crash meanwhile loses those steps). New sessions and resumes are refused "
        "either way, and an unreachable store always refuses.",
    )
    store_log_interval_s: float = Field(
        10.0, gt=0, description="Store failures are logged at most once per this many seconds (per kind)."
    )
    lease_s: float = Field(
        30.0, gt=0, description="Ownership lease of a session in the shared store, in seconds."
    )
    replica_id: str = Field(
        default_factory=_default_replica_id, description="This replica's id (hostname-pid)."
    )
    tombstone_ttl_s: float = Field(
        3600.0, ge=0, description="How long a gone session still answers NOT_FOUND with its reason."
    )
    max_tombstones: int = Field(
        100_000, ge=0, description="Most remembered gone sessions (oldest forgotten first)."
    )
    sweep_interval_s: float = Field(1.0, gt=0, description="Seconds between idle/lifetime expiry sweeps.")
    gc_freeze_survivors: bool = Field(
        True,
        description=(
            "Freeze (gc.freeze) what lives past each loop probe tick and what survives a full collection, so"
            " collections walk only new objects: their pauses no longer grow with open streams"
            " (service/server/loopwatch.py)."
        ),
    )
    loop_probe_interval_s: float = Field(
        0.05, ge=0, description="Seconds between event-loop lag probes (0 = no probe, no trimming)."
    )
    # -- idle-session tiering (docs/DESIGN.md, "Spill tier") --
    spill_after_s: float = Field(
        120.0,
        ge=0,
        description="Sessions idle this many seconds leave the resident slab for the spill tier on local disk"
        " (with store redis: the store's copy) and come back on their next call (0 = never; a model's"
        " config.yaml may override it).",
    )
    spill_dir: Path | None = Field(
        None, description="Directory of the spill files (default: a private temporary directory)."
    )
    spill_max_bytes: int = Field(
        8 * 1024**3,
        ge=0,
        description="Disk budget of the spill tier in bytes; when full, idle sessions stay resident (counted"
        " in rnnserve_spill_refusals_total) and the memory budget alone bounds new sessions.",
    )
    spill_batch: int = Field(512, ge=1, description="Most sessions the spiller moves per turn.")
    spill_duty: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Share of the event loop's time the spiller may take while it has work (it sleeps the"
        " rest, so hot sessions keep their step rate: at 0.1, hot sessions on a saturated loop stepped 0.88x"
        " as fast, tests/bench/sessions.py; at 0.05 the spiller still moves about 1,700 sessions a second).",
    )
    # -- long-lived streams (README "Long-lived streams") --
    stream_holds_sessions: bool = Field(
        True,
        description="An open Stream keeps its session alive: no idle expiry while it is open (and, with the"
        " shared store, its lease and stored record are kept fresh); the idle TTL counts from the stream's"
        " end."
        " Off: the idle TTL runs while a stream is silent, and the stream is told 'idle' when it expires.",
    )
    max_open_streams: int = Field(
        50_000,
        ge=1,
        description="Most open streams (Stream, StreamMany, ModelStreamInfer) on this server; more are"
        " refused with RESOURCE_EXHAUSTED.",
    )
    max_streams_per_connection: int = Field(
        10_000,
        ge=1,
        description="Most open streams on one client connection; more are refused with RESOURCE_EXHAUSTED"
        " (open another connection).",
    )
    keepalive_time_s: float = Field(
        30.0,
        gt=0,
        description="The server pings each client connection after this many seconds without activity, so a"
        " peer that is gone (crashed, unplugged, paused) is noticed on a silent stream"
        " (grpc.keepalive_time_ms).",
    )
    keepalive_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A ping not answered within this many seconds closes the connection: its streams end and"
        " their sessions are released (grpc.keepalive_timeout_ms, grpc.http2.ping_timeout_ms).",
    )
    keepalive_permit_without_calls: bool = Field(
        True,
        description="Ping connections with no open call too, and accept client pings on them"
        " (grpc.keepalive_permit_without_calls).",
    )
    keepalive_min_client_ping_s: float = Field(
        10.0,
        ge=0,
        description="Shortest interval between client pings the server accepts; a client pinging more often"
        " is sent GOAWAY after max_ping_strikes (grpc.http2.min_ping_interval_without_data_ms).",
    )
    keepalive_max_ping_strikes: int = Field(
        2,
        ge=0,
        description="Too-frequent client pings tolerated before GOAWAY (grpc.http2.max_ping_strikes; 0 = no"
        " limit).",
    )
    workers: int = Field(
        0,
        ge=0,
        le=255,
        description="Worker processes serving the one gRPC port (0 = the CPUs this container may use: the"
        " cgroup CPU quota, else the CPU affinity count; 1 = a single process, no supervisor).",
    )
    session_id_prefix: str = Field(
        "", max_length=16, description="Prefix of new session ids (set per worker by the supervisor)."
    )
    owner_table_slots: int = Field(
        1 << 20,
        ge=2,
        description="Slots of the workers' shared KServe sequence owner table (8 bytes each, rounded up to a"
        " power of two; up to 3/4 of them hold live sequences; used with workers > 1).",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    request_log: Literal["json", "logfmt", "off"] = Field(
        "json",
        description="Request log: one line per unary call and per stream end (json, logfmt or off).",
    )
    request_log_sample: float = Field(
        1.0, ge=0, le=1, description="Fraction of successful calls in the request log (errors: all of them)."
    )
    # -- security (docs: README "Security") --
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gRPC port: set (with tls_key_file) = TLS only."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    health_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Plaintext port serving only grpc.health.v1, for the kubelet's gRPC probes (which cannot"
        " speak TLS) when the gRPC port does (-1 = off, 0 = pick a free one).",
    )
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle for client certificates: set = mutual TLS (clients without a certificate"
        " signed by it are refused in the handshake).",
    )
    metrics_tls: bool = Field(
        False, description="Serve /metrics over HTTPS with the gRPC certificate (default: plain HTTP)."
    )
    auth: Literal["api_keys", "none"] = Field(
        "none",
        description="'api_keys': every RPC but health and reflection needs 'authorization: Bearer <key>'"
        " (keys from api_keys_file); 'none': open server for local development only.",
    )
    api_keys_file: Path | None = Field(
        None, description="YAML file of hashed API keys, each mapped to a tenant and a role (auth api_keys)."
    )
    state_budget_bytes: int = Field(
        0,
        ge=0,
        description="Session memory budget shared by all models, in bytes; creating or resuming a session"
        " beyond it is refused (0 = state_budget_fraction of the cgroup memory limit, else of the machine).",
    )
    state_budget_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the memory limit given to sessions if state_budget_bytes=0."
    )
    tenant_max_sessions: int = Field(
        0, ge=0, description="Default per-tenant limit of open sessions (0 = none; keys file overrides)."
    )
    tenant_max_state_bytes: int = Field(
        0, ge=0, description="Default per-tenant session memory in bytes (0 = none; keys file overrides)."
    )
    tenant_max_steps_per_s: float = Field(
        0.0, ge=0, description="Default per-tenant applied chunks per second (0 = none; keys file overrides)."
    )

    @model_validator(mode="after")
    def _security_consistent(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.metrics_tls and self.tls_cert_file is None:
            raise ValueError("metrics_tls needs tls_cert_file and tls_key_file")
        if self.auth == "api_keys" and self.api_keys_file is None:
            raise ValueError("auth = api_keys needs api_keys_file (or auth = none for local development)")
        if not self.grpc_host:
            self.grpc_host = "127.0.0.1" if self.auth == "none" else "0.0.0.0"
        return self


def _yaml_values(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SystemExit(f"config file {path} must hold a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _env_values() -> set[str]:
    """Names of settings present in the environment (pydantic-settings parses their values)."""
    return {
        name
        for name in Settings.model_fields
        if any(k.upper() == f"{ENV_PREFIX}{name}".upper() for k in os.environ)
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve-server",
        description="Stateful gRPC inference server for recurrent models. "
        "Precedence: flags > RNNSERVE_* environment > --config file > defaults.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, help="YAML settings file (also RNNSERVE_CONFIG).")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=field.description)
        else:
            parser.add_argument(flag, type=str, metavar=name.upper(), help=field.description)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Build the settings from `argv` flags, the environment and an optional YAML file (that precedence)."""
    flags = vars(_parser().parse_args(argv))
    config_path = flags.pop("config", None) or os.environ.get(f"{ENV_PREFIX}CONFIG")
    file_values = _yaml_values(Path(config_path)) if config_path else {}
    # Init kwargs beat the environment in pydantic-settings, so the file's values are passed only for the
    # fields the environment does not set; flags always win.
    env_names = _env_values()
    merged = {k: v for k, v in file_values.items() if k not in env_names}
    merged.update(flags)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise SystemExit(f"invalid settings:\n{exc}") from exc
