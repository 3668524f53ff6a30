"""The chaos run: clients drive many sessions across three replicas while a fault injector breaks everything.

Processes: one redis-server (AOF, fsync always) and `replicas` server processes sharing it. Client threads
drive native sessions and KServe sequences (tests/chaos/drivers.py), moving each session's traffic to a random
replica now and then. Fault injectors, one per replica and one for Redis, loop until the run ends:

- `kill`: SIGKILL the replica (a crashed pod), start it again;
- `term`: SIGTERM (a drained pod), start it again;
- `pause`: SIGSTOP for 1.3-2 leases (a GC pause or a slow node; another replica takes its sessions), SIGCONT;
- `pause_short`: SIGSTOP for a fraction of a lease, SIGCONT;
- `redis_kill` / `redis_term`: SIGKILL / SIGTERM redis-server, start it again on the same data directory.

At the end every replica is resumed and running, native sessions are described (last_seq against what was
acknowledged), and the checker (tests/chaos/checker.py) replays every session in ONNX Runtime.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import fixtures
import numpy as np
from tqdm import tqdm

from tests.chaos.checker import Counts, Reference, SessionLog, check_session
from tests.chaos.cluster import ChaosRedis, Cluster
from tests.chaos.drivers import MODEL, KServeDriver, NativeDriver, Router, Stats

REPLICA_FAULTS = (("pause", 0.4), ("pause_short", 0.2), ("kill", 0.25), ("term", 0.15))
REDIS_FAULTS = (("redis_kill", 0.5), ("redis_term", 0.5))


@dataclass
class ChaosConfig:
    """One run's shape. The defaults are the full run (`make chaos`)."""

    seed: int = 20261202
    replicas: int = 3
    native_sessions: int = 24
    kserve_sequences: int = 16
    client_threads: int = 8
    chunk_t: int = 3
    lease_s: float = 1.0
    p_move: float = 0.2
    target_faults: int = 1000
    max_duration_s: float = 1800.0
    # The short run ends at max_duration_s only once this many steps and faults are in (on a loaded machine
    # replicas restart slowly and clients get fewer steps through); never later than max_duration_s + extra.
    min_acks: int = 0
    min_faults: int = 0
    extra_s: float = 0.0
    replica_gap_s: tuple[float, float] = (0.3, 1.0)
    redis_gap_s: tuple[float, float] = (3.0, 6.0)
    call_timeout_s: float = 6.0
    give_up_s: float = 90.0
    progress: bool = True


@dataclass
class ChaosResult:
    """What a run did and what the checker found."""

    config: ChaosConfig
    faults: Counter = field(default_factory=Counter)
    counts: Counts = field(default_factory=Counts)
    stats: Stats = field(default_factory=Stats)
    duration_s: float = 0.0
    replica_starts: int = 0
    injector_errors: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # per faulty session: answers, faults, replica logs

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def to_json(self) -> dict:
        c = self.config
        return {
            "seed": c.seed,
            "replicas": c.replicas,
            "native_sessions": c.native_sessions,
            "kserve_sequences": c.kserve_sequences,
            "lease_s": c.lease_s,
            "p_move": c.p_move,
            "duration_s": round(self.duration_s, 1),
            "faults_injected": self.faults_injected,
            "faults_by_kind": dict(sorted(self.faults.items())),
            "replica_starts": self.replica_starts,
            "requests": self.stats.requests,
            "request_errors": self.stats.errors,
            "sessions_abandoned": self.stats.abandoned,
            **self.counts.summary(),
            "faults_found": self.counts.faults[:50],
            "injector_errors": self.injector_errors[:10],
            "evidence": self.evidence[:200],
        }


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


class Injector:
    """Fault loops (one per replica, one for Redis) until `stop` is set; counts what it injected."""

    def __init__(self, cluster: Cluster, cfg: ChaosConfig, stop: threading.Event) -> None:
        self.cluster, self.cfg, self.stop = cluster, cfg, stop
        self.faults: Counter = Counter()
        self.errors: list[str] = []
        # (monotonic start, monotonic end, kind, target): what was broken when, for a fault's evidence
        self.timeline: list[tuple[float, float, str, str]] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(
                target=self._replica_loop, args=(i, random.Random(cfg.seed * 31 + i)), daemon=True
            )
            for i in range(cfg.replicas)
        ] + [threading.Thread(target=self._redis_loop, args=(random.Random(cfg.seed * 17),), daemon=True)]

    def _count(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def _replica_loop(self, i: int, rng: random.Random) -> None:
        lease = self.cfg.lease_s
        while not self.stop.wait(rng.uniform(*self.cfg.replica_gap_s)):
            kind = _pick(rng, REPLICA_FAULTS)
            r = self.cluster.replicas[i]
            target, began = (r.name if r is not None else f"r{i}"), time.monotonic()
            try:
                if kind == "kill":
                    self.cluster.kill(i)
                elif kind == "term":
                    self.cluster.terminate(i)
                elif kind == "pause":
                    self.cluster.pause(i, rng.uniform(1.3, 2.0) * lease)
                else:
                    self.cluster.pause(i, rng.uniform(0.05, 0.4) * lease)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
                self.errors.append(f"{kind} r{i}: {exc!r}"[:300])
                continue
            self._count(kind)
            self.timeline.append((began, time.monotonic(), kind, target))

    def _redis_loop(self, rng: random.Random) -> None:
        while not self.stop.wait(rng.uniform(*self.cfg.redis_gap_s)):
            kind = _pick(rng, REDIS_FAULTS)
            began = time.monotonic()
            try:
                self.cluster.redis.restart(signal.SIGKILL if kind == "redis_kill" else signal.SIGTERM)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{kind}: {exc!r}"[:300])
                continue
            self._count(kind)
            self.timeline.append((began, time.monotonic(), kind, "redis"))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


Driver = NativeDriver | KServeDriver


def make_drivers(cfg: ChaosConfig, cluster: Cluster, stats: list[Stats]) -> list[list[Driver]]:
    """The sessions each client thread drives (native first, then KServe), each with its own router."""
    vocab = len(fixtures.DEFAULT_VOCAB)
    ids = itertools.count(1)
    np_rng = np.random.default_rng(cfg.seed)
    py_rng = random.Random(cfg.seed)
    drivers: list[list[Driver]] = [[] for _ in range(cfg.client_threads)]
    for n in range(cfg.native_sessions + cfg.kserve_sequences):
        t = n % cfg.client_threads
        router = Router(lambda: cluster.channels, random.Random(py_rng.random()), cfg.p_move)
        common = dict(
            chunk_t=cfg.chunk_t, call_timeout_s=cfg.call_timeout_s, give_up_s=cfg.give_up_s, stats=stats[t]
        )
        rng = np.random.default_rng(np_rng.integers(1 << 62))
        if n < cfg.native_sessions:
            drivers[t].append(NativeDriver(f"native-{n}", router, rng, vocab, **common))
        else:
            drivers[t].append(
                KServeDriver(f"kserve-{n}", router, rng, vocab, sequence_ids=lambda: next(ids), **common)
            )
    return drivers


def drive(
    cfg: ChaosConfig, cluster: Cluster, drivers: list[list[Driver]], stats: list[Stats]
) -> tuple[Injector, float]:
    """Run the clients and the fault injector until enough faults (or time); returns the injector, seconds."""
    stop = threading.Event()

    def client(mine: list[Driver]) -> None:
        while not stop.is_set():
            for d in mine:
                d.step()

    clients = [threading.Thread(target=client, args=(d,), daemon=True) for d in drivers]
    injector = Injector(cluster, cfg, stop)
    started = time.monotonic()
    for c in clients:
        c.start()
    injector.start()
    try:
        with tqdm(total=cfg.target_faults, desc="faults", unit="fault", disable=not cfg.progress) as bar:
            while True:
                time.sleep(0.5)
                n = sum(injector.faults.values())
                bar.update(n - bar.n)
                elapsed = time.monotonic() - started
                enough = sum(s.acks for s in stats) >= cfg.min_acks and n >= cfg.min_faults
                if n >= cfg.target_faults or elapsed > cfg.max_duration_s + (0 if enough else cfg.extra_s):
                    break
    finally:
        stop.set()
        injector.join()
        for c in clients:
            c.join(cfg.give_up_s + 30)
    return injector, time.monotonic() - started


def evidence(
    log: SessionLog,
    counts: Counts,
    timeline: list[tuple[float, float, str, str]],
    t0: float,
    workdir: Path,
    window_s: float = 4.0,
) -> list[str]:
    """What one faulty session's report needs: its last answers, the faults around them, the replicas' logs.

    Times are seconds since the clients started.
    """
    out = [f"== {log.name}: " + "; ".join(counts.faults)]
    acked = [(k, e) for k, e in enumerate(log.events) if e.t]
    times = [e.t for _, e in acked[-6:]] + [n.t for n in log.notes]
    for k, e in acked[-6:]:
        what = "acknowledged" if e.output is not None else "unknown outcome"
        out.append(f"  t={e.t - t0:7.2f} event {k} (seq {k + 1}) {what} by {e.replica}")
    for n in log.notes:
        out.append(f"  t={n.t - t0:7.2f} {n.replica}: {n.text}")
    if times:
        lo, hi = min(times) - window_s, max(times) + 1.0
        for began, ended, kind, target in timeline:
            if ended >= lo and began <= hi:
                out.append(f"  fault {kind} {target}: t={began - t0:.2f}..{ended - t0:.2f}")
    sid = next((w for n in log.notes for w in n.text.split() if w.startswith("session=")), "")
    if sid:
        key = sid.split("=", 1)[1]
        for path in sorted(workdir.glob("replica-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if key in line:
                    out.append(f"  {path.stem}: {line[:240]}")
    return out


def run_chaos(workdir: Path, cfg: ChaosConfig) -> ChaosResult:
    """Build a repository, start Redis and the replicas, drive and break them, check. Returns the result."""
    repository = workdir / "repository"
    fixtures.token_lstm(repository, MODEL)
    redis_server = ChaosRedis(workdir / "redis")
    redis_server.start()
    cluster = Cluster(
        workdir,
        repository,
        redis_server,
        cfg.replicas,
        lease_s=cfg.lease_s,
        drain_grace_s=1.0,
        idle_ttl_s=3600,
    )
    result = ChaosResult(cfg)
    try:
        cluster.start_all()
        stats = [Stats() for _ in range(cfg.client_threads)]
        drivers = make_drivers(cfg, cluster, stats)
        t0 = time.monotonic()
        injector, result.duration_s = drive(cfg, cluster, drivers, stats)
        result.faults = injector.faults
        # Everything back up and resumed, then the final reads.
        for i in range(cfg.replicas):
            if cluster.pid(i) is None:
                cluster.start(i)
        every = [d for mine in drivers for d in mine]
        for d in every:
            d.finish()
        logs = [log for d in every for log in ([d.log] if isinstance(d, NativeDriver) else d.logs)]
        ref = Reference(repository / MODEL / "1" / "model.onnx")
        for log in logs:
            counts = check_session(ref, log)
            result.counts.add(counts)
            if not counts.clean:
                result.evidence += evidence(log, counts, injector.timeline, t0, workdir)
        for s in stats:
            result.stats.requests += s.requests
            result.stats.errors += s.errors
            result.stats.abandoned += s.abandoned
            result.stats.acks += s.acks
        result.replica_starts = cluster.starts
        result.injector_errors = injector.errors
    finally:
        cluster.stop_all()
        redis_server.stop()
    return result
