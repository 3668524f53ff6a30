"""Every Prometheus metric of the server, created on an injected `CollectorRegistry` (no global state).

Naming follows Prometheus conventions: base units in the name, counters end in `_total`, few bounded labels
(model, version, method, code, protocol, reason); never a session id. The edges (native gRPC, KServe) record
`requests_total` by method and code; the engine records the rest.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 50 us to 10 s: a one-step message is ~100 us, a long chunk can take seconds.
LATENCY_BUCKETS = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The server's metrics on one registry; labelled children of hot metrics are cached per model version."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rnnserve_requests",
            "RPCs handled, by method and final status code.",
            ["method", "code", "protocol"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "rnnserve_queue_seconds",
            "Time a step waited in the batcher queue.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "rnnserve_compute_seconds",
            "Time of one batch: gather, ONNX Runtime run, scatter.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "rnnserve_request_seconds",
            "End-to-end engine latency of a step, from arrival to result.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Sessions per ONNX Runtime run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "rnnserve_steps",
            "Timesteps applied (a chunk of T steps counts T).",
            ["model", "version"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "rnnserve_active_sessions",
            "Open sessions.",
            ["model", "version"],
            registry=r,
        )
        self.sessions_created = Counter(
            "rnnserve_sessions_created",
            "Sessions opened.",
            ["model", "protocol"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "rnnserve_sessions_ended",
            "Sessions ended, by reason (closed, idle, lifetime, capacity, shutdown, moved).",
            ["model", "reason"],
            registry=r,
        )
        self.state_bytes = Gauge(
            "rnnserve_state_bytes",
            "Raw recurrent state bytes held by open sessions.",
            ["model", "version"],
            registry=r,
        )
        self.model_versions = Gauge(
            "rnnserve_model_versions_loaded",
            "Model versions in memory (current and pinned old ones).",
            registry=r,
        )

    def request(self, method: str, code: str, protocol: str = "native") -> None:
        """Count one finished RPC (called by the edges)."""
        self.requests.labels(method, code, protocol).inc()
