"""Every Prometheus metric of the server, created on an injected `CollectorRegistry` (no global state).

Naming follows Prometheus conventions: base units in the name, counters end in `_total`, few bounded labels
(model, version, method, code, protocol, reason); never a session id. The edges (native gRPC, KServe) record
`requests_total` by method and code; the engine records the rest.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

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
# Event-loop lag and collection pauses, 1 ms to 5 s: fine enough to tell a 20 ms stall from a 50 ms one.
STALL_BUCKETS = (
    1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
)  # fmt: skip


class BulkHistogram(Collector):
    """A Prometheus histogram fed a whole batch at a time (numpy), exposed through a custom collector.

    `prometheus_client.Histogram.observe` takes a lock and walks the buckets in Python for each value: a few
    microseconds per request on the hot path. A batch of B latencies costs one `searchsorted` + `bincount`
    here instead. Exposition is the standard histogram (`_bucket{le}`, `_count`, `_sum`).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._children: dict[tuple[str, ...], BulkHistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> BulkHistogramChild:
        """Return the child for one label set (cache it: it is the hot-path handle)."""
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = BulkHistogramChild(self.bounds)
            return child

    def remove(self, *values: str) -> None:
        """Forget one label set (e.g. an unloaded model version)."""
        with self._lock:
            self._children.pop(tuple(str(v) for v in values), None)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Yield the standard histogram exposition of every label set."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts, total = child.counts.copy(), child.sum
            cumulative = np.cumsum(counts)
            buckets = [(repr(float(b)), float(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(key), buckets, total)
        yield family


class BulkHistogramChild:
    """Bucket counts of one label set; updated from the event loop thread only."""

    __slots__ = ("bounds", "counts", "sum", "_edges")

    def __init__(self, bounds: np.ndarray) -> None:
        self.bounds = bounds
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last bucket is +Inf
        self.sum = 0.0
        self._edges = tuple(float(b) for b in bounds)  # for one value, bisect beats a numpy call tenfold

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect_left(self._edges, value)] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        """Record many values at once."""
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.sum += float(values.sum())


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
        self.queue_seconds = BulkHistogram(
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
        self.request_seconds = BulkHistogram(
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
            "rnnserve_sessions_opened",
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
        self.stale_reloads = Counter(
            "rnnserve_stale_reloads",
            "Resident session copies found older than the shared store on retaking a lease, and reloaded.",
            registry=r,
        )
        self.store_errors = Counter(
            "rnnserve_store_errors",
            "Session store operations that failed, by kind (unreachable; refused: out of memory, read-only).",
            ["kind"],
            registry=r,
        )
        self.undurable_steps = Counter(
            "rnnserve_undurable_steps",
            "Steps answered although the store refused to save them (store_refused = serve-held).",
            registry=r,
        )
        self.state_bytes = Gauge(
            "rnnserve_state_bytes",
            "Raw recurrent state bytes held by open sessions.",
            ["model", "version"],
            registry=r,
        )
        self.max_sessions = Gauge(
            "rnnserve_max_sessions",
            "Most open sessions this server accepts (the max_sessions setting).",
            registry=r,
        )
        self.model_max_sessions = Gauge(
            "rnnserve_model_max_sessions",
            "Most open sessions of a model (its config's max_sessions, capped by the server's).",
            ["model", "version"],
            registry=r,
        )
        self.state_budget_bytes = Gauge(
            "rnnserve_state_budget_bytes",
            "Recurrent state bytes a model version's sessions would hold at its session limit.",
            ["model", "version"],
            registry=r,
        )
        self.model_versions = Gauge(
            "rnnserve_model_versions_loaded",
            "Model versions in memory (current and pinned old ones).",
            registry=r,
        )

        self.memory_budget_bytes = Gauge(
            "rnnserve_session_memory_budget_bytes",
            "Session memory budget shared by all models and tenants (admission control, in bytes).",
            registry=r,
        )
        self.memory_budget_used_bytes = Gauge(
            "rnnserve_session_memory_used_bytes",
            "Session memory charged against the budget (state, cached outputs, per-session overhead).",
            registry=r,
        )
        self.admission_refusals = Counter(
            "rnnserve_admission_refusals",
            "Requests refused by admission control, by reason (budget, tenant_sessions, tenant_bytes,"
            " tenant_rate).",
            ["reason"],
            registry=r,
        )
        self.spilled_sessions = Gauge(
            "rnnserve_spilled_sessions", "Open sessions in the spill tier on local disk.", registry=r
        )
        self.spill_disk_bytes = Gauge(
            "rnnserve_spill_disk_bytes",
            "Bytes of the spill files (records ever needed at once x record size).",
            registry=r,
        )
        self.spill_budget_bytes = Gauge(
            "rnnserve_spill_budget_bytes", "Disk budget of the spill tier (spill_max_bytes).", registry=r
        )
        self.spills = Counter(
            "rnnserve_spills",
            "Sessions moved out of memory: to the spill tier (disk) or left to the shared store (store).",
            ["tier"],
            registry=r,
        )
        self.unspills = Counter(
            "rnnserve_unspills", "Sessions brought back from the spill tier on their next call.", registry=r
        )
        self.spill_refusals = Counter(
            "rnnserve_spill_refusals",
            "Idle sessions kept resident by the spiller, by reason (disk_full: spill_max_bytes reached;"
            " too_large: cached result or id longer than a record holds).",
            ["reason"],
            registry=r,
        )
        self.open_streams = Gauge(
            "rnnserve_open_streams",
            "Open streaming calls, by method (Stream, StreamMany, ModelStreamInfer).",
            ["method"],
            registry=r,
        )
        self.stream_refusals = Counter(
            "rnnserve_stream_refusals",
            "Streams refused at opening, by the limit that refused them (max_open_streams,"
            " max_streams_per_connection).",
            ["limit"],
            registry=r,
        )
        self.streams_ended = Counter(
            "rnnserve_streams_ended",
            "Streams ended, by method and reason: the client's requests ended (client: a half-close, or"
            " a connection that closed or failed its keepalive), a cancelled call (cancelled), an error"
            " (error), or what the server told the stream (idle, lifetime, capacity, draining, moved, closed,"
            " unloaded).",
            ["method", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "rnnserve_auth_failures",
            "Calls refused before reaching a handler, by reason (missing, malformed, unknown, role).",
            ["reason"],
            registry=r,
        )
        self.forwarded = Counter(
            "rnnserve_forwarded",
            "Calls (and requests of KServe streams) a worker passed to the worker that owns their session or"
            " sequence, by method (several workers only).",
            ["method"],
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "rnnserve_event_loop_lag_seconds",
            "How late a periodic probe callback ran on the event loop (a stall delays every stream).",
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "rnnserve_gc_pause_seconds",
            "Duration of each garbage collection, by generation (2 = full).",
            ["generation"],
            buckets=STALL_BUCKETS,
            registry=r,
        )

    def version_loaded(self, model: str, version: str, state_bytes: int, max_sessions: int) -> None:
        """Publish a loaded version's session limit and the state bytes it implies (the capacity budget)."""
        self.model_max_sessions.labels(model, version).set(max_sessions)
        self.state_budget_bytes.labels(model, version).set(state_bytes * max_sessions)

    def version_unloaded(self, model: str, version: str) -> None:
        """Forget an unloaded version's gauges."""
        gauges = (self.active_sessions, self.state_bytes, self.model_max_sessions, self.state_budget_bytes)
        for gauge in gauges:
            try:
                gauge.remove(model, version)
            except KeyError:
                pass

    def request(self, method: str, code: str, protocol: str = "native") -> None:
        """Count one finished RPC (called by the edges)."""
        self.requests.labels(method, code, protocol).inc()
