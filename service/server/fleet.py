"""The whole server seen from outside when it runs several workers: one /metrics, one health.

Metrics: each worker serves its own registry on a loopback port (announced in the run directory); the
supervisor's /metrics fetches every live worker's exposition on each scrape and sums samples with equal names
and labels: counters, histograms and additive gauges (sessions, bytes, capacities) are totals of the server;
gauges that every worker holds alike (versions loaded) take the maximum. A worker that is replaced hands its
last scraped counters and histograms on to the total (`retire`), so totals never go backwards. The supervisor
adds `rnnserve_workers`, `rnnserve_worker_up{worker}` and `rnnserve_worker_restarts_total{worker}`.

Health across workers is kept by each worker (`service.server.worker.watch_peers`).
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

_MAX_GAUGES = ("rnnserve_model_versions_loaded",)
_CUMULATIVE = ("counter", "histogram", "summary")

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Family:
    name: str
    documentation: str
    typ: str
    values: dict[Key, float] = field(default_factory=dict)


def _families(text: str) -> Iterator[Any]:
    yield from text_string_to_metric_families(text)


class FleetCollector(Collector):
    """Sum the workers' registries (module docstring)."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self._last: dict[int, list[Any]] = {}
        self._retired: dict[str, _Family] = {}
        self._lock = threading.Lock()

    def _scrape(self, k: int) -> list[Any] | None:
        info = self.sup.ready(k)
        if info is None:
            return None
        try:
            url = f"http://127.0.0.1:{info['metrics_port']}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback, own worker
                text = answer.read().decode()
        except OSError:
            return None
        families = list(_families(text))
        with self._lock:
            self._last[k] = families
        return families

    def retire(self, k: int, pid: int) -> None:
        """Worker k exited: keep its last counters and histograms in the totals."""
        with self._lock:
            families = self._last.pop(k, [])
            for fam in families:
                if fam.type in _CUMULATIVE:
                    _add(self._retired, fam, cumulative_only=True)

    def collect(self) -> Iterator[Metric]:
        """Yield the supervisor's own metrics, then every worker family summed."""
        merged: dict[str, _Family] = {}
        with self._lock:
            for fam in self._retired.values():
                merged[fam.name] = _Family(fam.name, fam.documentation, fam.typ, dict(fam.values))
        up = Metric("rnnserve_worker_up", "1 while the worker process serves, per worker.", "gauge")
        restarts = Metric("rnnserve_worker_restarts", "Times the supervisor restarted a worker.", "counter")
        for k in range(self.sup.workers):
            families = self._scrape(k)
            up.add_sample("rnnserve_worker_up", {"worker": str(k)}, 0.0 if families is None else 1.0)
            restarts.add_sample(
                "rnnserve_worker_restarts_total", {"worker": str(k)}, float(self.sup.restarts[k])
            )
            for fam in families or ():
                _add(merged, fam, cumulative_only=False)
        workers = Metric("rnnserve_workers", "Worker processes this server runs.", "gauge")
        workers.add_sample("rnnserve_workers", {}, float(self.sup.workers))
        yield workers
        yield up
        yield restarts
        for fam in merged.values():
            if not fam.values:
                continue  # e.g. the `_created` timestamps, which do not add up
            metric = Metric(fam.name, fam.documentation, fam.typ)
            for (name, labels), value in fam.values.items():
                metric.samples.append(Sample(name, dict(labels), value))
            yield metric


def _add(into: dict[str, _Family], fam: Any, *, cumulative_only: bool) -> None:
    target = into.get(fam.name)
    if target is None:
        target = into[fam.name] = _Family(fam.name, fam.documentation, fam.type)
    use_max = fam.type == "gauge" and fam.name in _MAX_GAUGES
    for sample in fam.samples:
        if sample.name.endswith("_created"):
            continue  # creation timestamps do not add up
        key = (sample.name, tuple(sample.labels.items()))  # workers write labels in one order
        old = target.values.get(key)
        if old is None:
            target.values[key] = sample.value
        elif use_max:
            target.values[key] = max(old, sample.value)
        else:
            target.values[key] = old + sample.value


@dataclass
class FleetMetrics:
    """The supervisor's /metrics HTTP server."""

    collector: FleetCollector
    httpd: Any
    port: int

    def retire(self, k: int, pid: int) -> None:
        """See FleetCollector.retire."""
        self.collector.retire(k, pid)

    def close(self) -> None:
        """Stop serving /metrics."""
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics(sup: Any) -> FleetMetrics | None:
    """Serve the summed /metrics on settings.metrics_port (None when metrics are off)."""
    from prometheus_client import start_http_server

    settings = sup.settings
    if settings.metrics_port < 0:
        return None
    registry = CollectorRegistry()
    collector = FleetCollector(sup)
    registry.register(collector)
    tls: dict[str, Any] = {}
    if settings.metrics_tls:
        tls = {"certfile": str(settings.tls_cert_file), "keyfile": str(settings.tls_key_file)}
    try:
        httpd, _thread = start_http_server(
            settings.metrics_port, addr=settings.grpc_host, registry=registry, **tls
        )
    except OSError as exc:
        sup.stop()
        raise SystemExit(f"cannot bind port {settings.metrics_port} (metrics): {exc}") from exc
    return FleetMetrics(collector, httpd, int(httpd.server_address[1]))
