"""Redis implementation of the session store seam (`service.stores.base.SessionStore`), redis-py asyncio.

Any replica can resume a session whose owner is gone: after every applied step (or every
`store_flush_every` steps) the owner writes the session's state, last seq and last response. The hot copy
stays in the owner's slab; Redis is only read when a replica meets a session it does not hold.

Keys (the `{session_id}` hash tag keeps both keys of a session in one Redis Cluster slot, so the scripts
below touch a single slot):

    <prefix>:{<session_id>}:rec     hash  blob (stores.snapshot bytes), seq, owner, gen; expires with it
    <prefix>:{<session_id>}:lease   string owner replica id, with a TTL of lease_s (SET NX PX semantics)
    <prefix>:kseq:<model>:<id>      string the session id of a KServe sequence (any replica can continue it)

Ownership and fencing (docs/DESIGN.md, "Fenced ownership"). A replica may advance a session only while it
holds the lease, and only from the version the store holds. The record carries `gen`, a version bumped by
every write. `save` is a compare-and-set executed atomically in Redis (one Lua script): it writes only if no
other replica holds a live lease AND the stored gen equals the gen the writer's copy was read at; it then
stores gen + 1 and renews the writer's lease. So a replica whose copy is older than the store's (it was idle
or paused past its lease while another replica advanced the session) is refused (`Stale`) whatever the lease
says, and history cannot fork. `acquire` takes or renews the lease and returns the stored gen in the same
step, so a replica that retakes a lease sees at once whether its resident copy is still current. Deletes are
fenced the same way. `release` hands a session over on drain.

What can be lost: with `store_flush_every = N` the store may lag the slab by up to N - 1 applied steps; if
the owner dies, those steps are gone (a client resuming elsewhere is told the expected seq and re-sends
them). With N = 1 (the default) the engine saves before it replies, so every reply a client has seen is
durable, and a retry of that seq on another replica is answered from the stored last response.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

# Replies that mean "Redis is up but takes no writes" (maxmemory with noeviction, a read-only replica, and
# MISCONF: a failed RDB save with stop-writes-on-bgsave-error) become StoreRefused, not "unreachable".
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

from service.config import Settings
from service.errors import Aborted
from service.stores import snapshot
from service.stores.base import SessionRecord, SessionStore, StoreRefused, StoreUnavailable, stale

# KEYS: rec, lease. ARGV: owner, lease_ms, seq, blob, record_ttl_ms, gen (the writer's base version).
# Returns {1, new gen} when written, {0, holder} when another replica holds the lease, {2, stored gen} when
# the stored version is not the writer's base (a stale copy).
_SAVE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, holder} end
local stored = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if stored ~= tonumber(ARGV[6]) then return {2, stored} end
local gen = stored + 1
redis.call('HSET', KEYS[1], 'blob', ARGV[4], 'seq', ARGV[3], 'owner', ARGV[1], 'gen', gen)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, gen}
"""

# KEYS: lease, rec. ARGV: owner, lease_ms. Returns the stored gen (0: no record) once taken or renewed, -1
# when another replica holds the lease.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return tonumber(redis.call('HGET', KEYS[2], 'gen') or '0')
"""

# KEYS: rec, lease. ARGV: owner, gen. 1 = deleted, 0 = the record moved on or another replica holds the lease.
_DELETE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') ~= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# KEYS: sequence key. ARGV: session id, ttl_ms, expected session id ("" = none). 1 = set, 0 = it moved.
_MAP = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: sequence key. ARGV: session id. 1 = removed (it still pointed there).
_UNMAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease. ARGV: owner, lease_ms. 1 = taken or renewed, 0 = another holder.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner. 1 = released, 0 = not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStore(SessionStore):
    """Sessions in Redis with an ownership lease per session (see the module docstring)."""

    persistent = True

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = 30.0,
        hmac_key: bytes | None = None,
        prefix: str = "rnnserve",
        socket_timeout_s: float = 5.0,
    ) -> None:
        """Connect lazily to `url` (redis://host:port/db); `hmac_key` signs the stored blobs."""
        self.url = url
        self.lease_s = lease_s
        self.prefix = prefix
        self._key = hmac_key
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._save = self._redis.register_script(_SAVE)
        self._claim = self._redis.register_script(_CLAIM)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._delete = self._redis.register_script(_DELETE)
        self._unmap = self._redis.register_script(_UNMAP)
        self._map = self._redis.register_script(_MAP)
        self._release = self._redis.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """Build the store the server uses when `settings.store == "redis"`."""
        key = settings.state_hmac_key.encode() if settings.state_hmac_key else None
        return cls(settings.redis_url, lease_s=settings.lease_s, hmac_key=key)

    def _rec(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:rec"

    def _lease(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:lease"

    def _unreachable(self, exc: Exception) -> StoreUnavailable:
        why = None
        if isinstance(exc, OutOfMemoryError):
            why = "out of memory: Redis reached maxmemory"
        elif isinstance(exc, ReadOnlyError):
            why = "read-only: a replica, not the primary"
        elif isinstance(exc, ResponseError) and str(exc).startswith("MISCONF"):
            why = "MISCONF: Redis cannot persist and stops writes"
        if why is not None:
            return StoreRefused(f"session store at {self.url} refuses writes ({why}); retry later")
        kind = type(exc).__name__
        return StoreUnavailable(f"session store at {self.url} is unreachable ({kind}); retry shortly")

    async def ping(self) -> None:
        """Raise `Unavailable` unless Redis answers (used at start-up, so a bad URL fails fast)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def save(self, record: SessionRecord) -> int:
        """Write the record if the store is still at `record.gen` and no other replica holds the lease.

        Returns the new version and renews the lease. Raises `Aborted` when another replica owns the session,
        `Stale` when the store holds a newer version: either way the caller must not answer the step.
        """
        if not record.owner:
            raise ValueError("RedisStore.save needs record.owner (the replica id that holds the lease)")
        blob = snapshot.encode(record, self._key)
        # The record outlives an idle session by one lease, so a replica can still tell why it is gone.
        ttl_ms = _ms(record.idle_ttl_s + self.lease_s)
        keys = [self._rec(record.session_id), self._lease(record.session_id)]
        args: list[str | int | bytes] = [
            record.owner, _ms(self.lease_s), record.last_seq, blob, ttl_ms, record.gen
        ]
        try:
            ok, value = await self._save(keys=keys, args=args)
        except NoScriptError:  # redis-py reloads scripts itself; this covers a SCRIPT FLUSH race
            ok, value = await self._save(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if ok == 1:
            return int(value)
        if ok == 2:
            raise stale(record.session_id, record.gen, int(value), record.last_seq)
        holder_id = value.decode() if isinstance(value, bytes) else str(value)
        raise Aborted(
            f"session {record.session_id} is owned by replica {holder_id}; replica {record.owner} "
            f"lost its lease and did not apply seq {record.last_seq}: retry to resume the session"
        )

    async def load(self, session_id: str) -> SessionRecord | None:
        """Return the stored record (state, last seq, last outputs, version), or None if there is none."""
        try:
            blob, gen = await self._redis.hmget(self._rec(session_id), ["blob", "gen"])
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if blob is None:
            return None
        rec = snapshot.decode(blob if isinstance(blob, bytes) else blob.encode("latin-1"), self._key)
        rec.gen = int(gen or 0)
        return rec

    async def delete(self, session_id: str, gen: int | None = None, owner: str = "") -> bool:
        """Forget a session and its lease; True if deleted.

        Unconditionally, or only if still at version `gen` and the lease is free or `owner`'s.
        """
        try:
            if gen is None:
                await self._redis.delete(self._rec(session_id), self._lease(session_id))
                return True
            keys = [self._rec(session_id), self._lease(session_id)]
            return bool(await self._delete(keys=keys, args=[owner, gen]))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def acquire(self, session_id: str, owner: str, lease_s: float) -> int | None:
        """Take or renew the lease and return the stored version (0: no record); None if another holds it."""
        try:
            keys = [self._lease(session_id), self._rec(session_id)]
            gen = int(await self._acquire(keys=keys, args=[owner, _ms(lease_s)]))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc
        return None if gen < 0 else gen

    def _seq(self, key: str) -> str:
        return f"{self.prefix}:kseq:{key}"

    async def map_sequence(
        self, key: str, session_id: str, ttl_s: float, expected: str | None = None
    ) -> bool:
        """Point a KServe sequence key at its session for `ttl_s`, if it still points at `expected`."""
        try:
            args: list[str | int] = [session_id, _ms(ttl_s), expected or ""]
            return bool(await self._map(keys=[self._seq(key)], args=args))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def sequence_session(self, key: str) -> str | None:
        """Return the session a KServe sequence key points at, or None."""
        try:
            value = await self._redis.get(self._seq(key))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def unmap_sequence(self, key: str, session_id: str) -> None:
        """Remove a sequence key if it still points at `session_id`."""
        try:
            await self._unmap(keys=[self._seq(key)], args=[session_id])
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew the lease if it is free or `owner`'s; False if another replica holds it.

        `lease_s <= 0` gives the lease up instead (what the engine does on shutdown): same as `release`.
        """
        if lease_s <= 0:
            await self.release(session_id, owner)
            return True
        try:
            return bool(await self._claim(keys=[self._lease(session_id)], args=[owner, _ms(lease_s)]))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def release(self, session_id: str, owner: str) -> bool:
        """Give the lease up (drain/handover) if `owner` holds it, so another replica can claim at once."""
        try:
            return bool(await self._release(keys=[self._lease(session_id)], args=[owner]))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def lease_holder(self, session_id: str) -> str | None:
        """Who holds the session's lease now (diagnostics and tests)."""
        try:
            holder = await self._redis.get(self._lease(session_id))
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if holder is None:
            return None
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
