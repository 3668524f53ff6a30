"""Sessions through the real front proxy: affinity, spread, scale-out, crash, drain, and the proxy's cost.

One scenario, run short by `tests/deploy/test_proxy_routing.py` (in `make test`) and in full by
`deploy/proxy_report.py` (`make proxy-check`), against real processes only: a redis-server (the shared
session store), server replicas (`python -m service.server`, store=redis, one loopback address each, one
port, as pods), dnsmasq answering the headless Service's name (the cluster DNS), and HAProxy running the
shipped `deploy/components/haproxy/haproxy.cfg`. Clients are the library's `Client` (native unary `Step` and
`Stream`) and tritonclient (KServe sequences, with the affinity header in `headers=`); every reply's trailing
metadata `x-rnnserve-replica` says which replica served it.

Phases (every native session takes part in each; outputs are compared at the end with one ONNX Runtime pass
over each session's whole history, so a step lost or applied twice anywhere would show):

1. three replicas: every call of a session (CreateSession, Step, Stream) and of a KServe sequence reaches one
   replica; the sessions spread over the three (max/min);
2. proxy cost: unary steps and stream chunks through the proxy and directly to the same replica, interleaved;
3. scale-out: a fourth replica joins the DNS answer; the sessions that move all move to it (about a quarter);
4. crash: one replica is SIGKILLed; only its sessions move;
5. drain: one replica gets SIGTERM while every session streams; its sessions move, no client sees an error.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from service.client import AFFINITY_HEADER, Client, Session, new_affinity_key
from service.proto import rnnserve_pb2 as pb
from tests.deploy.proxy import (
    HAPROXY_CFG,
    Call,
    ClusterDNS,
    HAProxy,
    ObservedClient,
    RoutingRecorder,
    free_port,
    replica_of,
    ring,
    start_haproxy,
    wait_until_routed_to,
)
from tests.deploy.redis_server import RedisServer
from tests.deploy.replicas import Replica, start_replica

MODEL = "tiny_lstm"
LEASE_S = 1.0
DRAIN_GRACE_S = 5.0


@dataclass(frozen=True)
class Scale:
    """How much traffic one run drives."""

    sessions: int  # native sessions
    sequences: int  # KServe sequences
    latency_pairs: int  # interleaved proxied/direct unary steps (and as many stream chunks)
    workers: int = 8  # client threads, one Client (one connection) each
    chunk: int = 2  # tokens per step


SHORT = Scale(sessions=48, sequences=12, latency_pairs=100, workers=6)
FULL = Scale(sessions=300, sequences=60, latency_pairs=2000, workers=8)


@dataclass
class Driven:
    """One native session and everything sent and received on it."""

    session: Session
    tokens: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)  # the replica of each phase

    @property
    def key(self) -> str:
        return self.session.affinity_key


@dataclass
class Report:
    """The figures of one run (JSON-serialisable)."""

    scale: dict[str, int]
    replicas_before: list[str]
    sessions_per_replica: dict[str, int]
    spread_max_over_min: float
    calls_checked: int
    sessions_on_one_replica: int
    kserve_sequences_on_one_replica: int
    kserve_calls_checked: int
    scale_out_new_replica: str
    scale_out_moved: int
    scale_out_moved_fraction: float
    scale_out_moved_elsewhere: int
    kill_victim: str
    kill_victim_sessions: int
    kill_moved_others: int
    drain_victim: str
    drain_victim_sessions: int
    drain_moved_others: int
    drain_client_errors: int
    drain_exit_code: int | None
    drain_seconds: float
    max_abs_diff: float
    latency_ms: dict[str, dict[str, float]]
    proxies_disagree_fraction: float | None = None
    seconds: float = 0.0
    config: str = ""
    sessions_per_replica_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_samples_ms: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Every figure (the raw latency samples left out)."""
        out = asdict(self)
        del out["latency_samples_ms"]
        return out


class Cluster:
    """redis + replicas + DNS + HAProxy, all real processes on loopback."""

    def __init__(
        self, workdir: Path, repository: Path, redis: RedisServer, config: Path = HAPROXY_CFG
    ) -> None:
        self.workdir, self.repository, self.redis, self.config = workdir, repository, redis, config
        self.port = free_port()
        self.replicas: dict[str, Replica] = {}
        self.ips: dict[str, str] = {}
        self.dns = ClusterDNS(workdir)
        self.proxies: list[HAProxy] = []

    def start_replicas(self, names: list[str]) -> None:
        """Start replicas in parallel, each on its own loopback address and the shared port."""
        for name in names:
            self.ips[name] = f"127.0.0.{2 + len(self.ips)}"
        settings = dict(
            store="redis",
            redis_url=self.redis.url,
            store_flush_every=1,
            lease_s=LEASE_S,
            drain_grace_s=DRAIN_GRACE_S,
            grpc_port=self.port,
        )
        with ThreadPoolExecutor(len(names)) as pool:
            started = pool.map(
                lambda n: start_replica(n, self.workdir, self.repository, grpc_host=self.ips[n], **settings),
                names,
            )
            for replica in started:
                self.replicas[replica.name] = replica

    def address(self, name: str) -> str:
        """A replica's own gRPC address (Replica.address assumes 127.0.0.1)."""
        return f"{self.ips[name]}:{self.port}"

    def publish(self, names: list[str]) -> None:
        """The DNS answer (the headless Service's ready endpoints) becomes exactly these replicas."""
        self.dns.set(self.ips[n] for n in names)

    def start(self, names: list[str]) -> None:
        self.start_replicas(names)
        self.dns.addresses = [self.ips[n] for n in names]
        self.dns.start()
        self.proxies.append(start_haproxy(self.workdir, self.port, self.dns, config=self.config))

    @property
    def proxy(self) -> HAProxy:
        return self.proxies[0]

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
        self.dns.stop()
        for r in self.replicas.values():
            r.stop()


def reference_logits(repository: Path, tokens: np.ndarray) -> np.ndarray:
    """One uninterrupted ONNX Runtime pass over a whole history, from the zero state."""
    sess = ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds: dict[str, np.ndarray] = {"tokens": tokens[None, :]}
    for i in sess.get_inputs():
        if i.name.startswith("state_in_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], dtype=np.float32)
    return sess.run(["logits"], feeds)[0][0]


def _put_result(results: queue.SimpleQueue[Any], result: Any, error: Any) -> None:
    """tritonclient's stream callback: queue the result, or the error."""
    results.put(error if error is not None else result)


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": float(len(a))}


class Scenario:
    """The five phases over one cluster (see the module docstring). Progress goes to `progress(text)`."""

    def __init__(
        self,
        cluster: Cluster,
        scale: Scale,
        progress: Callable[[str], None] = lambda _text: None,
        seed: int = 0,
    ) -> None:
        self.cluster, self.scale, self.progress = cluster, scale, progress
        self.rng = np.random.default_rng(seed)
        self.recorder = RoutingRecorder()
        self.clients = [
            ObservedClient(cluster.proxy.address, recorder=self.recorder, timeout=30)
            for _ in range(scale.workers)
        ]
        self.sessions: list[Driven] = []
        self.vocab = reference_logits(cluster.repository, np.zeros(1, dtype=np.int64)).shape[-1]
        self.errors: list[BaseException] = []
        self.latency_samples_ms: dict[str, list[float]] = {}

    def close(self) -> None:
        for c in self.clients:
            c.close()

    # ---- driving ------------------------------------------------------------------------------------------

    def _chunk(self) -> np.ndarray:
        return self.rng.integers(0, self.vocab, size=self.scale.chunk, dtype=np.int64)

    def _each(self, work: Callable[[int, Driven], None]) -> None:
        """Run `work` on every session; session i belongs to worker i % workers (its client)."""

        def run(w: int) -> None:
            for d in self.sessions[w :: self.scale.workers]:
                try:
                    work(w, d)
                except BaseException as exc:  # reported by the caller with the replica logs
                    self.errors.append(exc)
                    return

        threads = [threading.Thread(target=run, args=(w,)) for w in range(self.scale.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _step_and_stream(self, d: Driven, chunks_in_stream: int = 2) -> None:
        chunks = [self._chunk() for _ in range(1 + chunks_in_stream)]
        d.tokens.append(chunks[0])
        d.outputs.append(d.session.step(chunks[0])["logits"])
        for chunk, out in zip(chunks[1:], d.session.stream(chunks[1:]), strict=True):
            d.tokens.append(chunk)
            d.outputs.append(out["logits"])

    def _phase_calls(self, phase: str) -> dict[str, list[Call]]:
        """Every call recorded since the last phase, per affinity key; the session's replica is the one that
        answered its last successful call (streams report when they end)."""
        time.sleep(0.2)
        calls = RoutingRecorder.by_key(self.recorder.take())
        if self.errors:
            raise RuntimeError(f"{phase}: {len(self.errors)} client errors; first: {self.errors[0]!r}")
        for d in self.sessions:
            answered = [c.replica for c in calls.get(d.key, []) if c.code == "OK"]
            assert answered and answered[-1] is not None, f"{phase}: no answer of {d.session.id} was recorded"
            d.replicas.append(answered[-1])
        return calls

    # ---- phases -------------------------------------------------------------------------------------------

    def open_sessions(self) -> tuple[int, int]:
        """Phase 1: open every session and drive it; every call of a session must reach one replica."""
        self.progress("open sessions")
        per_worker: list[list[Driven]] = [[] for _ in range(self.scale.workers)]

        def open_one(w: int) -> None:
            client = self.clients[w]
            for _ in range(w, self.scale.sessions, self.scale.workers):
                d = Driven(client.session(MODEL))
                per_worker[w].append(d)
                self._step_and_stream(d)

        threads = [threading.Thread(target=open_one, args=(w,)) for w in range(self.scale.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Interleave back so that session i belongs to worker i % workers, as `_each` expects.
        for i in range(self.scale.sessions):
            self.sessions.append(per_worker[i % self.scale.workers][i // self.scale.workers])
        calls = self._phase_calls("open")
        checked = 0
        for d in self.sessions:
            served = [c.replica for c in calls[d.key]]
            methods = len(served)
            assert methods >= 3, f"session {d.session.id}: only {methods} calls recorded"
            assert None not in served and len(set(served)) == 1, (
                f"session {d.session.id} was served by {served} (every call must reach one replica)"
            )
            checked += methods
        return checked, len(self.sessions)

    def kserve_sequences(self) -> tuple[int, int]:
        """Phase 1b: KServe sequences via tritonclient with the affinity header, each on one replica."""
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import service_pb2_grpc

        self.progress("kserve sequences")
        recorder = RoutingRecorder()
        on_one = checked = 0

        def run(w: int) -> None:
            client = grpcclient.InferenceServerClient(url=self.cluster.proxy.address)
            # Observe the replies' trailing metadata (tritonclient does not expose it).
            client._client_stub = service_pb2_grpc.GRPCInferenceServiceStub(
                grpc.intercept_channel(client._channel, recorder)
            )

            def request(k: int) -> list[Any]:
                tokens = self._chunk()[None, :]
                inp = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
                inp.set_data_from_numpy(tokens)
                return [inp]

            try:
                for i in range(w, self.scale.sequences, self.scale.workers):
                    headers = {AFFINITY_HEADER: new_affinity_key()}
                    flags = [dict(sequence_start=k == 0, sequence_end=k == 3) for k in range(4)]
                    first_unary = 0
                    if i % 2:
                        # Odd sequences begin on a KServe stream (headers go with start_stream), then go on
                        # with unary calls: those find the sequence only on the replica the stream used.
                        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
                        client.start_stream(partial(_put_result, results), headers=headers)
                        for k in range(2):
                            client.async_stream_infer(MODEL, request(k), sequence_id=1000 + i, **flags[k])
                        got = [results.get(timeout=30) for _ in range(2)]
                        client.stop_stream()
                        assert all(not isinstance(g, Exception) for g in got), got
                        first_unary = 2
                    for k in range(first_unary, 4):
                        client.infer(MODEL, request(k), sequence_id=1000 + i, headers=headers, **flags[k])
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=run, args=(w,)) for w in range(self.scale.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise RuntimeError(f"kserve: {self.errors[0]!r}")
        time.sleep(0.2)  # a stream's call reports when it has ended
        for key, calls in RoutingRecorder.by_key(recorder.take()).items():
            served = [c.replica for c in calls]
            streams = sum(c.method == "ModelStreamInfer" for c in calls)
            assert len(served) == 4 - streams * 2 + streams and None not in served, (key, calls)
            assert len(set(served)) == 1, f"KServe sequence {key} was served by {served}"
            on_one += 1
            checked += len(served)
        assert on_one == self.scale.sequences
        return on_one, checked

    def latency(self) -> dict[str, dict[str, float]]:
        """Phase 2: per-step round trip through the proxy and directly to the same replica, interleaved."""
        self.progress("latency")
        proxy_client = Client(self.cluster.proxy.address, timeout=30)
        s = proxy_client.session(MODEL)
        owner = self._owner_of(s)
        direct_client = Client(self.cluster.address(owner), timeout=30)
        d = direct_client.session(MODEL)
        assert self._owner_of(d) == owner
        times: dict[str, list[float]] = {
            "unary proxy": [],
            "unary direct": [],
            "stream proxy": [],
            "stream direct": [],
        }
        try:
            for _ in range(self.scale.latency_pairs):
                for name, session in (("unary proxy", s), ("unary direct", d)):
                    t0 = time.perf_counter()
                    session.step(self._chunk())
                    times[name].append((time.perf_counter() - t0) * 1000)
            streams = {
                "stream proxy": s.stream(self._chunk() for _ in range(self.scale.latency_pairs)),
                "stream direct": d.stream(self._chunk() for _ in range(self.scale.latency_pairs)),
            }
            for _ in range(self.scale.latency_pairs):
                for name, stream in streams.items():
                    t0 = time.perf_counter()
                    next(stream)
                    times[name].append((time.perf_counter() - t0) * 1000)
            for stream in streams.values():
                stream.close()
        finally:
            s.close()
            d.close()
            proxy_client.close()
            direct_client.close()
        self.latency_samples_ms = times
        out = {k: percentiles(v) for k, v in times.items()}
        for kind in ("unary", "stream"):
            out[f"{kind} added"] = {
                q: out[f"{kind} proxy"][q] - out[f"{kind} direct"][q] for q in ("p50", "p99")
            }
        return out

    def _owner_of(self, session: Session) -> str:
        """The replica that answers this session's calls, read from a DescribeSession reply's trailer."""
        client = session.client
        _, call = client.stub.DescribeSession.with_call(
            pb.SessionRequest(session_id=session.id), metadata=session.metadata, timeout=10
        )
        owner = replica_of(call.trailing_metadata())
        assert owner is not None
        return owner

    def drive_all(self, phase: str) -> dict[str, str]:
        """Step and stream every session once; return each session's replica before and after."""
        before = {d.key: d.replicas[-1] for d in self.sessions}
        self._each(lambda _w, d: self._step_and_stream(d))
        calls = self._phase_calls(phase)
        for d in self.sessions:
            # A call that met a dead server is answered by the proxy (no replica) and retried; every call
            # that a server answered, successfully or not, came from one replica.
            served = {c.replica for c in calls[d.key] if c.replica is not None}
            assert len(served) == 1, f"{phase}: session {d.session.id} was served by {calls[d.key]}"
        return before

    def scale_out(self, new: str) -> tuple[int, int]:
        """Phase 3: add a replica; return (sessions moved, of which elsewhere than to the new one)."""
        self.progress("scale out")
        self.cluster.start_replicas([new])
        self.cluster.publish(list(self.cluster.replicas))
        self._wait_ring(set(self.cluster.replicas))
        before = self.drive_all("scale-out")
        moved = [d for d in self.sessions if d.replicas[-1] != before[d.key]]
        return len(moved), sum(1 for d in moved if d.replicas[-1] != new)

    def kill(self, victim: str) -> tuple[int, int]:
        """Phase 4: SIGKILL a replica (the DNS still lists it, as until Kubernetes drops the endpoint)."""
        self.progress("kill")
        on_victim = {d.key for d in self.sessions if d.replicas[-1] == victim}
        self.cluster.replicas[victim].kill()
        before = self.drive_all("kill")
        moved_others = sum(
            1 for d in self.sessions if d.key not in on_victim and d.replicas[-1] != before[d.key]
        )
        assert all(d.replicas[-1] != victim for d in self.sessions)
        alive = [n for n in self.cluster.replicas if n != victim]
        self.cluster.publish(alive)
        return len(on_victim), moved_others

    def drain(self, victim: str, rounds: int = 3) -> tuple[int, int, int | None, float]:
        """Phase 5: SIGTERM a replica while every session streams; no client may see an error."""
        self.progress("drain")
        replica = self.cluster.replicas[victim]
        on_victim = {d.key for d in self.sessions if d.replicas[-1] == victim}
        before = {d.key: d.replicas[-1] for d in self.sessions}
        started = threading.Event()
        took: list[float] = []

        def sigterm() -> None:
            started.wait(60)
            time.sleep(0.2)
            t0 = time.monotonic()
            replica.terminate()
            with contextlib.suppress(Exception):
                replica.process.wait(DRAIN_GRACE_S + 10)
            took.append(time.monotonic() - t0)

        def work(_w: int, d: Driven) -> None:
            started.set()
            for _ in range(rounds):
                self._step_and_stream(d, chunks_in_stream=3)

        killer = threading.Thread(target=sigterm)
        killer.start()
        errors_before = len(self.errors)
        self._each(work)
        killer.join()
        client_errors = len(self.errors) - errors_before
        if client_errors:
            raise RuntimeError(f"drain: {client_errors} client errors; first: {self.errors[errors_before]!r}")
        # The sessions that finished their rounds before the SIGTERM have not met the drain yet: one more
        # round for everyone, once the victim is gone from the DNS answer (as Kubernetes drops the endpoint).
        time.sleep(0.2)
        self.recorder.take()
        alive = [n for n, r in self.cluster.replicas.items() if n != victim and r.process.poll() is None]
        self.cluster.publish(alive)
        self.drive_all("after drain")
        moved_others = sum(
            1 for d in self.sessions if d.key not in on_victim and d.replicas[-1] != before[d.key]
        )
        assert all(d.replicas[-1] != victim for d in self.sessions)
        return len(on_victim), moved_others, replica.process.returncode, took[0] if took else float("nan")

    def _wait_ring(self, names: set[str]) -> None:
        with grpc.insecure_channel(self.cluster.proxy.address) as ch:
            wait_until_routed_to(ch, names, timeout_s=30)

    def exactness(self) -> float:
        """Max |outputs - one ORT pass over the whole history| over every session."""
        self.progress("check outputs")
        worst = 0.0
        for d in self.sessions:
            expected = reference_logits(self.cluster.repository, np.concatenate(d.tokens))
            got = np.concatenate(d.outputs)
            assert got.shape == expected.shape, (got.shape, expected.shape)
            worst = max(worst, float(np.abs(got - expected).max()))
        return worst

    def proxies_disagree(self, keys: int = 1000) -> float:
        """Start a second HAProxy on the same pods; the fraction of keys the two route differently.

        The DNS answer lists the pods in the reverse order first (CoreDNS shuffles its answers), so the second
        proxy fills its slots in another order than the first one did."""
        self.progress("second proxy")
        alive = [n for n, r in self.cluster.replicas.items() if r.process.poll() is None]
        self.cluster.publish(alive[::-1])
        second = start_haproxy(
            self.cluster.workdir,
            self.cluster.port,
            self.cluster.dns,
            name="haproxy-2",
            config=self.cluster.config,
        )
        self.cluster.proxies.append(second)
        probe_keys = [f"k{i}" for i in range(keys)]
        with (
            grpc.insecure_channel(self.cluster.proxy.address) as a,
            grpc.insecure_channel(second.address) as b,
        ):
            wait_until_routed_to(b, set(alive), timeout_s=30)
            ra, rb = ring(a, probe_keys), ring(b, probe_keys)
        return sum(1 for k in probe_keys if ra[k] != rb[k]) / keys


PHASES = ("open", "scale-out", "kill", "drain")


def run(
    workdir: Path,
    repository: Path,
    redis: RedisServer,
    scale: Scale,
    progress: Callable[[str], None] = lambda _text: None,
    second_proxy: bool = True,
    config: Path = HAPROXY_CFG,
) -> Report:
    """Run every phase; raise AssertionError (with the replica logs) when a check fails."""
    t0 = time.monotonic()
    cluster = Cluster(workdir, repository, redis, config)
    first = ["r1", "r2", "r3"]
    try:
        cluster.start(first)
        with grpc.insecure_channel(cluster.proxy.address) as ch:
            wait_until_routed_to(ch, set(first), timeout_s=30)
        scenario = Scenario(cluster, scale, progress)
        try:
            calls, _ = scenario.open_sessions()
            spread = Counter(d.replicas[-1] for d in scenario.sessions)
            kserve_on_one, kserve_calls = scenario.kserve_sequences()
            latency = scenario.latency()
            moved, elsewhere = scenario.scale_out("r4")
            kill_n, kill_others = scenario.kill("r2")
            drain_n, drain_others, code, drain_s = scenario.drain("r3")
            worst = scenario.exactness()
            disagree = scenario.proxies_disagree(scale.sessions * 4) if second_proxy else None
        finally:
            scenario.close()
    except BaseException as exc:
        logs = "\n".join(f"--- {n}:\n{r.log_text()[-1500:]}" for n, r in cluster.replicas.items())
        proxy_log = cluster.proxies[0].log_text()[-3000:] if cluster.proxies else ""
        raise AssertionError(f"{exc}\n{logs}\n--- haproxy:\n{proxy_log}") from exc
    finally:
        cluster.stop()
    counts = [spread.get(n, 0) for n in first]
    return Report(
        scale=asdict(scale),
        replicas_before=first,
        sessions_per_replica=dict(sorted(spread.items())),
        spread_max_over_min=max(counts) / max(min(counts), 1),
        calls_checked=calls,
        sessions_on_one_replica=len(scenario.sessions),
        kserve_sequences_on_one_replica=kserve_on_one,
        kserve_calls_checked=kserve_calls,
        scale_out_new_replica="r4",
        scale_out_moved=moved,
        scale_out_moved_fraction=moved / len(scenario.sessions),
        scale_out_moved_elsewhere=elsewhere,
        kill_victim="r2",
        kill_victim_sessions=kill_n,
        kill_moved_others=kill_others,
        drain_victim="r3",
        drain_victim_sessions=drain_n,
        drain_moved_others=drain_others,
        drain_client_errors=0,
        drain_exit_code=code,
        drain_seconds=drain_s,
        max_abs_diff=worst,
        latency_ms=latency,
        proxies_disagree_fraction=disagree,
        seconds=time.monotonic() - t0,
        config=config.name,
        sessions_per_replica_by_phase={
            phase: dict(sorted(Counter(d.replicas[i] for d in scenario.sessions).items()))
            for i, phase in enumerate(PHASES)
        },
        latency_samples_ms=scenario.latency_samples_ms,
    )
