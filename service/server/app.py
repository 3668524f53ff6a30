"""Server lifecycle: gRPC server (native API, KServe v2, health, reflection) and /metrics; drain on signals.

`start(settings)` binds (port 0 picks a free port; `RunningServer.port` is what `add_insecure_port` returned)
and returns a handle whose `stop()` shuts down in dependency order:

1. health NOT_SERVING (overall and per model), so load balancers and probes stop sending new work;
2. new work RPCs are refused with UNAVAILABLE "server draining; reconnect"; open native streams end with that
   status (idle ones at once, busy ones after their current step) so clients reconnect elsewhere;
3. in-flight unary calls finish (bounded by the grace period);
4. the engine drains (refuses new sessions, finishes queued steps, flushes sessions to the store);
5. `server.stop()` cancels what is left (idle health watches and KServe streams), the engine stops (runtimes
   released) and the metrics HTTP server closes.

`main()` runs it under `asyncio.run` with SIGTERM/SIGINT wired through `loop.add_signal_handler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service.config import Settings, load_settings
from service.core.engine import Engine
from service.proto import rnnserve_pb2 as pb
from service.server import auth, kserve, tls
from service.server.interceptors import CallObserver, ErrorMappingInterceptor
from service.server.loopwatch import LoopWatch
from service.server.native import RecurrentServicer
from service.server.native import add_to_server as add_native
from service.server.request_log import Lookup, RequestLog
from service.server.routing import Router
from service.server.streams import StreamRegistry
from service.server.supervisor import default_workers, supervise

_log = logging.getLogger("rnnserve.server")

NATIVE_SERVICE = pb.DESCRIPTOR.services_by_name["RecurrentService"].full_name
KSERVE_SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _protocol_of(service: str) -> str:
    if service.startswith("inference."):
        return "kserve"
    if service.startswith("rnnserve."):
        return "native"
    return "grpc"  # health, reflection


def _model_lookup(engine: Engine) -> Lookup:
    """For the request log: a call's model, version and time axis, by session id (if open) or model name."""
    sessions = engine.session_manager.table.sessions

    def lookup(model: str, session_id: str) -> tuple[str, int, bool] | None:
        s = sessions.get(session_id) if session_id else None
        if s is not None:
            spec = s.mv.spec
        elif not model:
            return None
        else:
            try:
                spec = engine.get_model(model)
            except Exception:  # noqa: BLE001 - an unknown model: the line keeps what the request named
                return None
        return spec.name, spec.version, spec.time_axis

    return lookup


def _call_observer(engine: Engine) -> CallObserver | None:
    """Count every finished RPC in the engine's `Metrics.requests` (method, code, protocol)."""
    metrics = getattr(engine, "metrics", None)
    if metrics is None:
        _log.warning("engine exposes no metrics; RPCs are not counted")
        return None
    children: dict[tuple[str, str], Any] = {}

    def observe(method: str, code: str, seconds: float) -> None:
        child = children.get((method, code))
        if child is None:  # labels() takes a lock and hashes; cache the child per (method, code)
            service, _, name = method.lstrip("/").rpartition("/")
            child = children[(method, code)] = metrics.requests.labels(name, code, _protocol_of(service))
        child.inc()

    return observe


@dataclass(eq=False)
class RunningServer:
    """A started server. `stop()` is idempotent and safe to call from signal handling and tests alike."""

    settings: Settings
    server: aio.Server
    engine: Engine
    health: health_aio.HealthServicer
    streams: StreamRegistry
    interceptor: ErrorMappingInterceptor
    port: int
    metrics_port: int | None
    model_names: set[str] = field(default_factory=set)
    kserve: Any = None
    health_port: int | None = None
    _health_server: Any = None
    _metrics_http: Any = None
    _stopping: asyncio.Task[None] | None = None
    _serving: bool = True
    _health_task: asyncio.Task[None] | None = None
    watch: LoopWatch | None = None

    @property
    def address(self) -> str:
        """`host:port` a local client can dial."""
        host = self.settings.grpc_host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def is_serving(self) -> bool:
        """Return False once a drain has begun (KServe ServerReady uses this too)."""
        return self._serving

    async def set_models(self, names: Iterable[str]) -> None:
        """Set the health status per model name: SERVING for loaded models, NOT_SERVING for the others.

        The others: models that went away, and models on disk whose every version was refused at load (the
        reason is in the log, the ReloadRepository answer and KServe's RepositoryIndex).
        """
        names = set(names)
        status = SERVING if self._serving else NOT_SERVING
        refused = {r.name for r in self.engine.refusals()} - names
        for gone in (self.model_names - names) | refused:
            await self.health.set(gone, NOT_SERVING)
        for name in names:
            await self.health.set(name, status)
        self.model_names = names

    async def _follow_repository(self, interval_s: float) -> None:
        """Keep per-model health in step with versions the engine's repository watcher loads or drops."""
        refused: set[str] = set()
        while self._serving:
            await asyncio.sleep(interval_s)
            names = {s.name for s in self.engine.list_models()}
            now_refused = {r.name for r in self.engine.refusals()}
            if (names != self.model_names or now_refused != refused) and self._serving:
                refused = now_refused
                await self.set_models(names)

    async def _stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        self._serving = False
        if self._health_task is not None:
            self._health_task.cancel()
        # 1. Probes and balancers see NOT_SERVING first (overall, per service, per model).
        for name in ["", NATIVE_SERVICE, KSERVE_SERVICE, *sorted(self.model_names)]:
            await self.health.set(name, NOT_SERVING)
        # 2. Refuse new work (UNAVAILABLE "server draining; reconnect"); idle native streams end now, busy
        #    ones after their current step.
        self.interceptor.draining = True
        self.streams.drain()
        # 3. In-flight unary calls and busy streams finish (bounded by the grace period) ...
        while (self.interceptor.in_flight or self.streams.open_count) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            # 4. ... and so does whatever the engine still has queued; it flushes sessions to the store.
            try:
                await asyncio.wait_for(self.engine.drain(), timeout=max(deadline - time.monotonic(), 0.1))
            except Exception:  # noqa: BLE001 - shutdown goes on; the cause is logged
                _log.exception("engine drain did not complete cleanly")
            # 5. What is left is idle (health watches, idle KServe streams) or past the grace: cancel it.
            await self.server.stop(0)
            if self.kserve is not None:
                with contextlib.suppress(Exception):
                    await self.kserve.sequences.close_all()
        finally:
            if self.watch is not None:
                self.watch.stop()
            await self.engine.stop()
            if self._health_server is not None:
                await self._health_server.stop(0)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
        _log.info("rnnserve stopped")

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop within `grace` seconds (default: settings.drain_grace_s). Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._stop(self.settings.drain_grace_s if grace is None else grace)
            )
        await asyncio.shield(self._stopping)

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server has stopped."""
        await self.server.wait_for_termination()


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """Return the gRPC server's keepalive and HTTP/2 ping options (README, "Long-lived streams")."""
    return [
        ("grpc.keepalive_time_ms", round(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.keepalive_timeout_s * 1000)),
        # gRPC core times the ping's ack with its own ping timeout (one minute unless set): the same bound.
        ("grpc.http2.ping_timeout_ms", round(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        # A silent stream sends no data: without this, the server stops pinging it after two pings.
        ("grpc.http2.max_pings_without_data", 0),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(settings.keepalive_min_client_ping_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
    ]


def _start_metrics_http(settings: Settings, registry: CollectorRegistry) -> tuple[Any, int | None]:
    if settings.metrics_port < 0:
        return None, None
    from prometheus_client import start_http_server

    tls: dict[str, Any] = {}
    if settings.metrics_tls:
        tls = {"certfile": str(settings.tls_cert_file), "keyfile": str(settings.tls_key_file)}
    httpd, _thread = start_http_server(
        settings.metrics_port, addr=settings.grpc_host, registry=registry, **tls
    )
    return httpd, int(httpd.server_address[1])


def _health_only_server(
    settings: Settings, health: health_aio.HealthServicer, *, shared: bool = False
) -> tuple[aio.Server | None, int | None]:
    """Build a plaintext server with only grpc.health.v1 (same statuses) on `health_port`, for probes.

    `shared`: worker processes bind the one health port together (SO_REUSEPORT), as they do the gRPC port.
    """
    if settings.health_port < 0:
        return None, None
    server = aio.server(options=[("grpc.so_reuseport", 1 if shared else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")


def _check_port(host: str, port: int, what: str, flag: str) -> None:
    """Fail in one line, before the models load, when `host:port` cannot be bound (in use, bad host)."""
    if port <= 0:
        return
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise SystemExit(f"rnnserve: cannot resolve {what} host {host!r}: {exc.strerror or exc}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is fine
            try:
                probe.bind(addr)
            except OSError as exc:
                why = (
                    "is already in use"
                    if exc.errno == errno.EADDRINUSE
                    else f"cannot be bound ({exc.strerror})"
                )
                raise SystemExit(
                    f"rnnserve: {what} port {port} on {host} {why}; choose another with {flag} "
                    f"(or stop the process that holds it)"
                ) from None


async def start(
    settings: Settings, *, registry: CollectorRegistry | None = None, router: Router | None = None
) -> RunningServer:
    """Load the repository, bind the gRPC and metrics ports and start serving.

    `router`: this process is one of several workers (service.server.supervisor): the port is shared with
    SO_REUSEPORT, the worker also listens on its Unix socket, and calls for other workers' sessions are
    forwarded (the router is outermost; the owner maps errors and authenticates the forwarded call).
    """
    if router is None:  # a worker shares a port the supervisor already bound and checked
        _check_port(settings.grpc_host, settings.grpc_port, "gRPC", "--grpc-port / RNNSERVE_GRPC_PORT")
        _check_port(
            settings.grpc_host, settings.metrics_port, "metrics", "--metrics-port / RNNSERVE_METRICS_PORT"
        )
    registry = registry if registry is not None else CollectorRegistry()
    engine = Engine(settings, registry=registry)
    if router is not None:
        router.forwarded = engine.metrics.forwarded
    await engine.start()
    # What start-up built (modules, models, runtimes) lives as long as the process: move it out of the
    # collector's reach, so full collections under load only walk what serving allocates.
    gc.collect()
    gc.freeze()

    interceptor = ErrorMappingInterceptor(
        _call_observer(engine),
        replica_id=settings.replica_id,
        request_log=RequestLog(settings.request_log, settings.request_log_sample, _model_lookup(engine)),
    )
    try:
        authenticator = auth.interceptor_for(settings, engine)
    except SystemExit:
        await engine.stop()
        raise
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Port 0 must give this process its own port, never one another process shares; workers share one.
        ("grpc.so_reuseport", 0 if router is None else 1),
        *keepalive_options(settings),
    ]
    # The error mapping is outermost: authentication refusals are typed errors, mapped and counted as others.
    # With auth none there is nothing to check: every call runs as tenancy.LOCAL, the context default.
    chain = [interceptor] if authenticator is None else [interceptor, authenticator]
    server = aio.server(interceptors=chain if router is None else [router, *chain], options=options)
    streams = StreamRegistry(settings, engine.metrics)
    health = health_aio.HealthServicer()
    holder: dict[str, RunningServer] = {}

    def on_reload(specs: list[Any]) -> None:
        running = holder.get("server")
        if running is not None:
            asyncio.ensure_future(running.set_models(s.name for s in specs))

    add_native(RecurrentServicer(engine, streams, on_reload=on_reload), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    kserve_servicer = kserve.add_to_server(
        server,
        engine,
        ready=lambda: holder["server"].is_serving(),
        streams=streams,
        owners=None if router is None else router.owners,
    )
    services = [NATIVE_SERVICE, KSERVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)

    try:
        credentials = tls.server_credentials(settings)
        target = f"{settings.grpc_host}:{settings.grpc_port}"
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
        if router is not None:
            server.add_insecure_port(f"unix:{router.peers.socket(router.peers.index)}")
        health_server, health_port = _health_only_server(settings, health, shared=router is not None)
        httpd, metrics_port = _start_metrics_http(settings, registry)
    except (RuntimeError, OSError) as exc:
        await engine.stop()
        raise SystemExit(
            f"rnnserve: cannot bind {settings.grpc_host}:{settings.grpc_port} (gRPC) or port "
            f"{settings.metrics_port} (metrics): {exc}"
        ) from None
    running = RunningServer(
        settings=settings,
        server=server,
        engine=engine,
        health=health,
        streams=streams,
        interceptor=interceptor,
        port=port,
        metrics_port=metrics_port,
        kserve=kserve_servicer,
        health_port=health_port,
        _health_server=health_server,
        _metrics_http=httpd,
    )
    holder["server"] = running
    # Statuses are in place before the first RPC can arrive.
    for name in ["", *services]:
        await health.set(name, SERVING)
    await running.set_models(s.name for s in engine.list_models())
    await server.start()
    if health_server is not None:
        await health_server.start()
    running.watch = _watch_loop(settings, engine, streams)
    if settings.repository_poll_s > 0:
        running._health_task = asyncio.ensure_future(running._follow_repository(settings.repository_poll_s))
    return running


def _watch_loop(settings: Settings, engine: Engine, streams: StreamRegistry) -> LoopWatch | None:
    """Start the loop-lag probe and the collector's survivor freezing (`loopwatch`), unless turned off."""
    if settings.loop_probe_interval_s <= 0:
        return None
    table = engine.session_manager.table
    watch = LoopWatch(
        engine.metrics,
        lambda: streams.open_count,
        interval_s=settings.loop_probe_interval_s,
        freeze=settings.gc_freeze_survivors,
        live=lambda: streams.open_count + len(table.sessions),
    )
    watch.start()
    return watch


def _announce(running: RunningServer) -> None:
    models = ", ".join(f"{s.name}:{s.version}" for s in running.engine.list_models()) or "(none)"
    scheme = "https" if running.settings.metrics_tls else "http"
    metrics = (
        f"{scheme}://{running.address.rsplit(':', 1)[0]}:{running.metrics_port}/metrics"
        if running.metrics_port
        else "off"
    )
    print(
        f"rnnserve listening: gRPC {running.settings.grpc_host}:{running.port} | metrics {metrics} | "
        f"models {models} | repository {running.settings.model_repository}",
        flush=True,
    )
    print(security_banner(running.settings, running.port), flush=True)


def security_banner(settings: Settings, port: int) -> str:
    """One line on transport and authentication; a loud block when the server is open (auth none)."""
    if settings.tls_cert_file is None:
        transport = "plaintext"
    else:
        transport = "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"
    if settings.auth != "none":
        return f"rnnserve security: {transport} | API keys from {settings.api_keys_file}"
    rule = "!" * 100
    return (
        f"{rule}\n"
        f"!! WARNING: authentication is OFF (auth: none), transport {transport}. Anyone who can reach\n"
        f"!! {settings.grpc_host}:{port} can create, read, fork and close every session and reload models.\n"
        "!! For local development only. Production: --auth api_keys --api-keys-file FILE and TLS\n"
        "!! (README, Security).\n"
        f"{rule}"
    )


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain within settings.drain_grace_s."""
    running = await start(settings)
    _announce(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"rnnserve draining (grace {settings.drain_grace_s:g}s)", flush=True)
    await running.stop()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `rnnserve-server` / `python -m service.server` (flags: see --help)."""
    args = sys.argv[1:] if argv is None else argv
    settings = load_settings(args)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    workers = settings.workers or default_workers()
    if workers > 1:  # worker processes behind the one port (service.server.supervisor)
        supervise(settings, args, workers, banner=security_banner)
        return
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
