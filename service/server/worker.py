"""One worker process of a multi-worker server (started by `service.server.supervisor`, never by hand).

`python -m service.server.worker K N RUN_DIR -- <server flags>`: the ordinary server (`app.start`) with a
`Router` (port shared through SO_REUSEPORT, its own Unix socket, calls forwarded to their session's owner,
KServe sequence owners in the shared table `RUN_DIR/owners`), its registry on a loopback metrics port that it
announces in `RUN_DIR/wK.json` (the supervisor's readiness signal), and `watch_peers`: the overall health ""
is SERVING only while every peer serves too, since a session owned by a peer that is down cannot be served
until its replacement is up. Peers are probed on their native service's status, which reflects the peer
itself (not its own view of the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from service.config import Settings, load_settings
from service.server.app import NATIVE_SERVICE, NOT_SERVING, SERVING, RunningServer, start
from service.server.ownership import OWNER_TABLE, OwnerTable
from service.server.routing import Peers, Router

PROBE_INTERVAL_S = 1.0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (no orphaned workers holding the port)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _serve_worker(settings: Settings, index: int, workers: int, run_dir: Path) -> None:
    owners = OwnerTable(run_dir / OWNER_TABLE, index)
    if settings.store != "redis":
        # A predecessor's sequences died with it; with the shared store they stay this worker's, which resumes
        # them from the store on their next call (same replica id: no lease to wait out).
        owners.release_all(index)
    router = Router(Peers(index, workers, run_dir), owners)
    registry = CollectorRegistry()
    with contextlib.suppress(FileNotFoundError):
        router.peers.socket(index).unlink()
    running = await start(settings, registry=registry, router=router)
    httpd, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    announce = run_dir / f"w{index}.json"
    tmp = announce.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "metrics_port": int(httpd.server_address[1])}))
    tmp.replace(announce)
    peers_task = asyncio.ensure_future(watch_peers(running, router))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    peers_task.cancel()
    await running.stop()
    await router.close()  # the owner table stays mapped until the process exits (late releases are harmless)
    httpd.shutdown()


def worker_main(args: list[str]) -> None:
    """`python -m service.server.worker K N RUN_DIR -- <server flags>`."""
    index, workers, run_dir = int(args[0]), int(args[1]), Path(args[2])
    flags = args[4:] if len(args) > 3 and args[3] == "--" else args[3:]
    _die_with_parent()
    settings = load_settings(flags)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s",
    )
    asyncio.run(_serve_worker(settings, index, workers, run_dir))


async def watch_peers(running: RunningServer, router: Router) -> None:
    """Keep this worker's overall health "" SERVING only while every peer worker serves too."""
    peers = [k for k in range(router.peers.workers) if k != router.peers.index]
    seen_up: set[int] = set()  # a peer still starting up (never seen serving) is not a peer that went down
    shown = SERVING
    while running.is_serving():
        status = SERVING
        for k in peers:
            stub = health_pb2_grpc.HealthStub(router.channel(k))
            try:
                answer = await stub.Check(
                    health_pb2.HealthCheckRequest(service=NATIVE_SERVICE), timeout=2.0, wait_for_ready=True
                )
                up = answer.status == SERVING
            except aio.AioRpcError:
                # No answer in time: a busy peer if connected, else a down one (no socket to connect to).
                up = router.channel(k).get_state() is grpc.ChannelConnectivity.READY
            if up or (router.peers.run_dir / f"w{k}.json").exists():  # serving, or announced it serves
                seen_up.add(k)
            if not up and k in seen_up:
                status = NOT_SERVING
        if status != shown and running.is_serving():
            with contextlib.suppress(Exception):
                await running.health.set("", status)
            shown = status
        await asyncio.sleep(PROBE_INTERVAL_S)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit("usage: python -m service.server.worker K N RUN_DIR -- <server flags>")
    worker_main(sys.argv[1:])
