"""Admission control in bytes: one session-memory budget for all models, and per-tenant quotas.

Every open session is charged what it holds in memory: its state row, the cached outputs of its last chunk
(exactly-once retries answer from them) and a fixed per-session overhead (the Python objects and table
entries). Opening a session (create, fork, resume from the store) is charged up front; a chunk longer than any
the session applied before grows the charge before it is submitted. A charge that would pass the budget is
refused with RESOURCE_EXHAUSTED naming the budget, so overload is refused before the process runs out of
memory instead of being OOM-killed with every session in it.

The budget defaults to a fraction of the container's memory limit (cgroup v2 `memory.max`, or v1
`memory.limit_in_bytes`), else of the machine's memory. Per-tenant quotas (sessions, bytes, timesteps per
second) come from the settings (defaults) and the keys file (per tenant); 0 means no limit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.config import Settings
from service.errors import ResourceExhausted
from service.metrics import Metrics

# Python objects and table entries of one session (Session with slots, id string, dict and bucket entries,
# tombstone): measured with tracemalloc at ~1 KiB; charged generously.
SESSION_OVERHEAD_BYTES = 2048
_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def memory_limit_bytes() -> tuple[int, str]:
    """Return the memory this process may use, and where the figure came from (cgroup limit, else machine)."""
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT:
            return int(text), f"cgroup limit {path}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine memory"


def default_budget(fraction: float) -> tuple[int, str]:
    """`fraction` of the memory limit, and a description for logs and messages."""
    limit, source = memory_limit_bytes()
    return int(limit * fraction), f"{fraction:g} x {source} ({limit} bytes)"


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits of one tenant; 0 = no limit."""

    max_sessions: int = 0
    max_state_bytes: int = 0
    max_steps_per_s: float = 0.0


@dataclass(slots=True)
class Usage:
    """What one tenant holds now, and its token bucket for timesteps per second."""

    sessions: int = 0
    bytes: int = 0
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)


class Admission:
    """The budget and the tenants' usage (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if settings.state_budget_bytes:
            self.budget, self.source = settings.state_budget_bytes, "state_budget_bytes"
        else:
            self.budget, self.source = default_budget(settings.state_budget_fraction)
        self.used = 0
        self.default = Quota(
            settings.tenant_max_sessions, settings.tenant_max_state_bytes, settings.tenant_max_steps_per_s
        )
        self.quotas: dict[str, Quota] = {}
        self.usage: dict[str, Usage] = {}
        self.metrics = metrics
        self._refusals = {
            r: metrics.admission_refusals.labels(r)
            for r in ("budget", "tenant_sessions", "tenant_bytes", "tenant_rate")
        }
        metrics.memory_budget_bytes.set(self.budget)
        # True when some tenant has a rate limit: only then does a step pay for the bucket arithmetic.
        self.rate_limited = self.default.max_steps_per_s > 0

    def set_quotas(self, quotas: dict[str, Quota]) -> None:
        """Per-tenant quotas (from the keys file); tenants not named get the defaults."""
        self.quotas = dict(quotas)
        self.rate_limited = self.default.max_steps_per_s > 0 or any(
            q.max_steps_per_s for q in quotas.values()
        )

    def quota(self, tenant: str) -> Quota:
        """Return the quota of `tenant`."""
        return self.quotas.get(tenant, self.default)

    def _refuse(self, reason: str, message: str) -> ResourceExhausted:
        self._refusals[reason].inc()
        return ResourceExhausted(message)

    def _check_bytes(self, tenant: str, usage: Usage, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.budget:
            raise self._refuse(
                "budget",
                f"session memory budget exhausted: {self.used} of {self.budget} bytes in use "
                f"(budget: {self.source}); {what} needs {nbytes} more; close sessions or retry later",
            )
        limit = self.quota(tenant).max_state_bytes
        if limit and usage.bytes + nbytes > limit:
            raise self._refuse(
                "tenant_bytes",
                f"tenant {tenant!r} holds {usage.bytes} of its {limit} bytes of session memory (quota "
                f"max_state_bytes); {what} needs {nbytes} more; close sessions or retry later",
            )

    def open(self, tenant: str, nbytes: int) -> None:
        """Charge a new session of `nbytes` to `tenant`, or refuse (RESOURCE_EXHAUSTED) without charging."""
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = Usage(tokens=self.quota(tenant).max_steps_per_s)
        limit = self.quota(tenant).max_sessions
        if limit and usage.sessions >= limit:
            raise self._refuse(
                "tenant_sessions",
                f"tenant {tenant!r} has {usage.sessions} open sessions, its quota (max_sessions {limit}); "
                "close sessions or retry later",
            )
        self._check_bytes(tenant, usage, nbytes, "a new session")
        usage.sessions += 1
        usage.bytes += nbytes
        self.used += nbytes
        self.metrics.memory_budget_used_bytes.set(self.used)

    def grow(self, tenant: str, nbytes: int) -> None:
        """Charge `nbytes` more to an open session of `tenant` (a longer chunk), or refuse."""
        usage = self.usage[tenant]
        self._check_bytes(tenant, usage, nbytes, "this chunk's cached outputs")
        usage.bytes += nbytes
        self.used += nbytes
        self.metrics.memory_budget_used_bytes.set(self.used)

    def release(self, tenant: str, nbytes: int) -> None:
        """Give back a session's bytes while it stays open (spilled to disk: only resident state counts)."""
        usage = self.usage.get(tenant)
        if usage is not None:
            usage.bytes -= nbytes
        self.used -= nbytes
        self.metrics.memory_budget_used_bytes.set(self.used)

    def regain(self, tenant: str, nbytes: int) -> None:
        """Charge an open session's bytes again (resumed from the spill tier), or refuse without charging."""
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = Usage(tokens=self.quota(tenant).max_steps_per_s)
        self._check_bytes(tenant, usage, nbytes, "resuming a spilled session")
        usage.bytes += nbytes
        self.used += nbytes
        self.metrics.memory_budget_used_bytes.set(self.used)

    def close(self, tenant: str, nbytes: int) -> None:
        """Release a session's whole charge."""
        usage = self.usage.get(tenant)
        if usage is not None:
            usage.sessions -= 1
            usage.bytes -= nbytes
            if usage.sessions <= 0:
                del self.usage[tenant]
        self.used -= nbytes
        self.metrics.memory_budget_used_bytes.set(self.used)

    def take_steps(self, tenant: str, steps: int) -> None:
        """Spend `steps` timesteps from the tenant's bucket (refill = its rate, burst = one second's worth).

        A chunk is admitted while the bucket is positive, and may drive it below zero: long chunks are never
        starved, and the average rate still holds.
        """
        rate = self.quota(tenant).max_steps_per_s
        if not rate:
            return
        usage = self.usage.get(tenant)
        if usage is None:
            return  # no open session: nothing can be stepped
        now = time.monotonic()
        usage.tokens = min(rate, usage.tokens + (now - usage.stamp) * rate)
        usage.stamp = now
        if usage.tokens <= 0:
            raise self._refuse(
                "tenant_rate",
                f"tenant {tenant!r} is over its rate quota (max_steps_per_s {rate:g} timesteps per second); "
                f"retry in {(-usage.tokens + 1) / rate:.3f} s",
            )
        usage.tokens -= steps
