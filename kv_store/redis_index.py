"""RedisIndex: the cluster KV index (:class:`kv_store.index.KVIndex`) on Redis, shared by every
router and store node of a cluster; plus :func:`make_index` ("memory" | "redis://...").

Data model (all keys start with ``prefix``, so several clusters or tests share one server;
block hashes are stored as raw 16-byte strings)::

    {p}nodes                 hash   node_id -> BlockLocation as JSON
    {p}b:<hash>              set    node ids holding the block (replicas)
    {p}n:<node_id>           set    hashes held by the node (for drop_node / resync)
    {p}d:<node_id>           set    those of them held only on the node's disk tier (Tier.DISK)
    {p}generation            string random token; missing after a Redis restart (see below)
    {p}lease:<lease_id>      hash   {node, hashes}; PEXPIRE = the lease's ttl
    {p}pin:<node_id>:<hash>  zset   lease_id -> expiry (ms, Redis server clock); key TTL = max

Every multi-key operation is one Lua script or one MULTI/EXEC pipeline, so readers never see a
block registered without its node (scripts name derived keys from ``prefix``: standalone Redis,
not Redis Cluster).

Contracts:

* Lookup: same as :class:`~kv_store.index.InMemoryIndex` (longest registered prefix, holders
  ordered by node id). Holders whose node is not in ``{p}nodes`` are ignored.
* Outage: no method of the :class:`KVIndex` protocol raises when Redis is unreachable. Lookups
  answer "nothing cached" (and :meth:`nodes` an empty list), writes are dropped and counted in
  :attr:`RedisIndex.write_failures`. After a failure the index stays "down" for
  ``retry_after_s`` (no network calls: callers do not pay a timeout each); the next call after
  that tries again. :meth:`ensure_generation` and :meth:`sync_node` do raise
  :class:`UnavailableError`: they are the probe and the repair used by
  :class:`kv_store.index_sync.IndexSyncer`.
* Recovery: Redis runs without persistence, so a restart loses the index. ``{p}generation`` is
  then missing; the first :meth:`ensure_generation` after it creates a new token, and every
  store's syncer, seeing a token it has not synced against (or a dropped write), re-registers all
  its blocks with :meth:`sync_node`.
* ``register`` for a node not in ``{p}nodes`` (e.g. right after a restart) writes nothing and
  counts as a dropped write (so the store re-syncs) instead of raising like InMemoryIndex.
* Leases (:meth:`lease`): cluster-wide TTL pins on blocks of one node, e.g. for an in-flight
  handoff or a router that planned a request on a cached prefix. A store's high-water eviction
  skips blocks that :meth:`leased` reports (see :class:`kv_store.store.BlockStore`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.block_hash import BlockHash
from kv_store.handle import BlockLocation, check_hashes
from kv_store.index import InMemoryIndex, KVIndex, LookupResult, Tier
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.redis_access import connect, is_redis_url

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFIX = "pdserve:kv:"
_BATCH = 1000  # hashes per script call (Lua unpack and argument limits)
_OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

_REGISTER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i - 1])
end
return 1
"""

_DROP_NODE = """
local hs = redis.call('SMEMBERS', KEYS[2])
for _, h in ipairs(hs) do redis.call('SREM', ARGV[2] .. 'b:' .. h, ARGV[1]) end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return #hs
"""

_SYNC_NODE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local want = {}
for i = 4, #ARGV do want[ARGV[i]] = true end
local removed = 0
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not want[h] then
    redis.call('SREM', ARGV[3] .. 'b:' .. h, ARGV[1])
    redis.call('SREM', KEYS[2], h)
    removed = removed + 1
  end
end
for i = 4, #ARGV do
  redis.call('SADD', ARGV[3] .. 'b:' .. ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return removed
"""

_LOOKUP = """
local out, seen = {}, {}
for i = 2, #KEYS do
  local live = {}
  for _, n in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    if seen[n] == nil then seen[n] = redis.call('HGET', KEYS[1], n) end
    if seen[n] then table.insert(live, n) end
  end
  if #live == 0 then break end
  table.insert(out, live)
end
local locs = {}
for n, v in pairs(seen) do
  if v then table.insert(locs, n); table.insert(locs, v) end
end
return {out, locs}
"""

_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'hashes', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[3])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""

_RELEASE = """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hs = redis.call('HGET', KEYS[1], 'hashes')
for i = 1, #hs, 16 do
  local k = ARGV[1] .. 'pin:' .. node .. ':' .. string.sub(hs, i, i + 15)
  redis.call('ZREM', k, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)  -- expired leases' entries go too
end
redis.call('DEL', KEYS[1])
return 1
"""

_LEASED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') > 0 and 1 or 0
end
return out
"""


def _loc_to_json(loc: BlockLocation) -> bytes:
    d = {"node_id": loc.node_id, "address": loc.address, "shm_name": loc.shm_name, "host_id": loc.host_id}
    return json.dumps(d, separators=(",", ":")).encode()


def _loc_from_json(raw: bytes) -> BlockLocation:
    return BlockLocation(**json.loads(raw))


def _batches(items: Sequence[T], n: int = _BATCH) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def redis_client(url: str, *, socket_timeout_s: float = 1.0, connect_timeout_s: float = 0.5) -> redis.Redis:
    """A bytes-in/bytes-out client with short timeouts and one immediate retry (which replaces a
    connection broken by a server restart), so an outage costs callers little time. Password and
    TLS (``rediss://``) as :mod:`pdserve.redis_access` says; a plaintext or unauthenticated Redis
    off loopback is refused there (RedisAccessError, an InvalidRequestError)."""
    return connect(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
    )


class RedisIndex:
    """:class:`KVIndex` on Redis (see module docstring for data model and contracts). Thread-safe.

    ``clock`` (monotonic seconds) times the down window after a failure (``retry_after_s``).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retry_after_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._p = prefix.encode()
        self._k_nodes = self._p + b"nodes"
        self._k_gen = self._p + b"generation"
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._mu = threading.Lock()
        self._down_until = float("-inf")
        self._down = False
        self._write_failures = 0
        self._register = client.register_script(_REGISTER)
        self._drop_node = client.register_script(_DROP_NODE)
        self._sync_node = client.register_script(_SYNC_NODE)
        self._lookup = client.register_script(_LOOKUP)
        self._lease = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)
        self._leased = client.register_script(_LEASED)

    @classmethod
    def from_url(cls, url: str, *, prefix: str | None = None, **kw: Any) -> RedisIndex:
        """``redis://host:port/db[?prefix=...]``; a ``prefix`` argument overrides the URL's."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_prefix = next((v for k, v in query if k == "prefix"), None)
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        client = redis_client(urlunsplit(parts._replace(query=rest)))
        return cls(client, prefix=prefix or url_prefix or DEFAULT_PREFIX, **kw)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ keys
    def _k_block(self, h: BlockHash) -> bytes:
        return self._p + b"b:" + h

    def _k_node(self, node_id: str) -> bytes:
        return self._p + b"n:" + node_id.encode()

    def _k_disk(self, node_id: str) -> bytes:
        return self._p + b"d:" + node_id.encode()

    def _k_lease(self, lease_id: str) -> bytes:
        return self._p + b"lease:" + lease_id.encode()

    def _k_pin(self, node_id: str, h: BlockHash) -> bytes:
        return self._p + b"pin:" + node_id.encode() + b":" + h

    # ------------------------------------------------------------------ outage handling
    @property
    def write_failures(self) -> int:
        """Writes dropped because Redis was unreachable (or the node was unknown) since start."""
        return self._write_failures

    @property
    def available(self) -> bool:
        """False while in the down window after a failure."""
        return not self._down

    def _failed(self, what: str, err: BaseException | None, write: bool) -> None:
        with self._mu:
            if write:
                self._write_failures += 1
            if err is None:
                return
            if not self._down:
                log.warning("KV index: Redis unreachable during %s (%s); degrading", what, err)
            self._down = True
            self._down_until = self._clock() + self.retry_after_s

    def _ok(self) -> None:
        if self._down:
            with self._mu:
                if self._down:
                    log.warning("KV index: Redis reachable again")
                self._down = False

    def _guarded(self, what: str, fn: Callable[[], T], fallback: T, *, write: bool) -> T:
        if self._down and self._clock() < self._down_until:
            self._failed(what, None, write)
            return fallback
        try:
            out = fn()
        except _OUTAGE as e:
            self._failed(what, e, write)
            return fallback
        self._ok()
        return out

    def _strict(self, what: str, fn: Callable[[], T]) -> T:
        try:
            out = fn()
        except _OUTAGE as e:
            self._failed(what, e, write=False)
            raise UnavailableError(f"KV index: Redis unreachable during {what}: {e}") from e
        self._ok()
        return out

    # ------------------------------------------------------------------ KVIndex
    def add_node(self, location: BlockLocation) -> None:
        if not location.node_id:
            raise InvalidRequestError("index: a node needs a non-empty node_id")
        raw = _loc_to_json(location)
        self._guarded(
            "add_node", lambda: self.client.hset(self._k_nodes, location.node_id, raw), None, write=True
        )

    def nodes(self) -> list[BlockLocation]:
        """Every announced node, by node id ([] during an outage)."""
        raw = self._guarded("nodes", lambda: self.client.hgetall(self._k_nodes), {}, write=False)
        return sorted((_loc_from_json(v) for v in raw.values()), key=lambda loc: loc.node_id)

    def register(self, node_id: str, hashes: Iterable[BlockHash], tier: Tier = Tier.DRAM) -> None:
        hs = check_hashes(hashes)
        tier = Tier(tier)

        def run() -> bool:
            known = True
            for part in _batches(hs):
                keys = [self._k_nodes, self._k_node(node_id), *(self._k_block(h) for h in part)]
                ok = bool(self._register(keys=keys, args=[node_id.encode(), *part]))
                known &= ok
                if ok and tier is Tier.DISK:
                    self.client.sadd(self._k_disk(node_id), *part)
                elif ok:
                    self.client.srem(self._k_disk(node_id), *part)
            return known

        if hs and not self._guarded("register", run, True, write=True):
            self._failed("register", None, write=True)  # unknown node: state lost, re-sync

    def unregister(self, node_id: str, hashes: Iterable[BlockHash]) -> None:
        hs = check_hashes(hashes)
        if not hs:
            return

        def run() -> None:
            pipe = self.client.pipeline(transaction=True)
            nid = node_id.encode()
            for h in hs:
                pipe.srem(self._k_block(h), nid)
            pipe.srem(self._k_node(node_id), *hs)
            pipe.srem(self._k_disk(node_id), *hs)
            pipe.execute()

        self._guarded("unregister", run, None, write=True)

    def drop_node(self, node_id: str) -> None:
        def run() -> None:
            self._drop_node(keys=[self._k_nodes, self._k_node(node_id)], args=[node_id.encode(), self._p])
            self.client.delete(self._k_disk(node_id))

        self._guarded("drop_node", run, None, write=True)

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        hs = check_hashes(hashes)
        if not hs:
            return LookupResult(0, ())

        def run() -> LookupResult:
            holders, flat = self._lookup(keys=[self._k_nodes, *(self._k_block(h) for h in hs)])
            locs = {flat[i].decode(): _loc_from_json(flat[i + 1]) for i in range(0, len(flat), 2)}
            names = [sorted(x.decode() for x in block) for block in holders]
            per_block = tuple(tuple(locs[n] for n in ns) for ns in names)
            return LookupResult(len(per_block), per_block, self._tiers(hs, names))

        return self._guarded("lookup", run, LookupResult(0, ()), write=False)

    def _tiers(self, hs: Sequence[BlockHash], names: list[list[str]]) -> tuple[tuple[Tier, ...], ...]:
        """Tiers parallel to a lookup's holders (one SMISMEMBER per holding node); () if all DRAM."""
        if not names:
            return ()
        nodes = sorted({n for ns in names for n in ns})
        pipe = self.client.pipeline(transaction=False)
        for n in nodes:
            pipe.smismember(self._k_disk(n), list(hs[: len(names)]))
        disk = {n: [bool(x) for x in r] for n, r in zip(nodes, pipe.execute(), strict=True)}
        out = tuple(tuple(Tier.DISK if disk[n][i] else Tier.DRAM for n in ns) for i, ns in enumerate(names))
        return out if any(Tier.DISK in t for t in out) else ()

    # ------------------------------------------------------------------ resync (used by IndexSyncer)
    def ensure_generation(self) -> str:
        """The index's generation token, creating one if missing (a fresh or restarted Redis).
        Raises :class:`UnavailableError` when Redis is unreachable (ignores the down window)."""

        def run() -> str:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._k_gen, uuid.uuid4().hex.encode(), nx=True)
            pipe.get(self._k_gen)
            return pipe.execute()[1].decode()

        return self._strict("ensure_generation", run)

    def sync_node(
        self, location: BlockLocation, hashes: Sequence[BlockHash], disk_hashes: Sequence[BlockHash] = ()
    ) -> int:
        """Make the index hold exactly ``hashes`` (DRAM) and ``disk_hashes`` (disk tier) for this
        node (announcing it too). Returns how many stale entries were removed. Raises
        :class:`UnavailableError`."""
        hs = check_hashes(hashes)
        dram = set(hs)
        disk = [h for h in check_hashes(disk_hashes, "disk_hashes") if h not in dram]
        keys = [self._k_nodes, self._k_node(location.node_id)]
        args = [location.node_id.encode(), _loc_to_json(location), self._p, *hs, *disk]

        def run() -> int:
            removed = int(self._sync_node(keys=keys, args=args))
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._k_disk(location.node_id))
            for part in _batches(disk):
                pipe.sadd(self._k_disk(location.node_id), *part)
            pipe.execute()
            return removed

        return self._strict("sync_node", run)

    # ------------------------------------------------------------------ leases
    def lease(self, node_id: str, hashes: Sequence[BlockHash], ttl_s: float) -> str:
        """Pin ``hashes`` on ``node_id`` cluster-wide for ``ttl_s`` seconds; returns the lease id
        ("" during an outage: no pin was recorded)."""
        hs = check_hashes(hashes)
        if not (ttl_s > 0):
            raise InvalidRequestError(f"index lease ttl_s must be > 0, got {ttl_s!r}")
        lid = uuid.uuid4().hex
        keys = [self._k_lease(lid), *(self._k_pin(node_id, h) for h in hs)]
        args = [node_id.encode(), max(1, round(ttl_s * 1000)), lid.encode(), b"".join(hs)]
        ok = self._guarded("lease", lambda: self._lease(keys=keys, args=args), None, write=False)
        return lid if ok else ""

    def release(self, lease_id: str) -> bool:
        """Drop a lease's pins; False if unknown, expired, or Redis is unreachable."""
        if not lease_id:
            return False
        keys = [self._k_lease(lease_id)]
        args = [self._p, lease_id.encode()]
        return bool(self._guarded("release", lambda: self._release(keys=keys, args=args), 0, write=False))

    def leased(self, node_id: str, hashes: Sequence[BlockHash]) -> list[bool]:
        """Per hash: pinned on ``node_id`` by an unexpired lease (all False during an outage)."""
        hs = check_hashes(hashes)
        if not hs:
            return []

        def run() -> list[bool]:
            out: list[bool] = []
            for part in _batches(hs):
                out += [bool(x) for x in self._leased(keys=[self._k_pin(node_id, h) for h in part])]
            return out

        return self._guarded("leased", run, [False] * len(hs), write=False)

    # ------------------------------------------------------------------ maintenance
    def num_blocks(self, node_id: str | None = None) -> int:
        """Blocks registered on ``node_id`` (or distinct blocks anywhere: a SCAN, for tests/tools)."""
        if node_id is not None:
            return int(self._strict("num_blocks", lambda: self.client.scard(self._k_node(node_id))))
        return sum(1 for _ in self.client.scan_iter(match=self._p + b"b:*", count=1000))

    def clear(self) -> int:
        """Delete every key under this index's prefix (tests, tools); returns how many."""
        n = 0
        for keys in _batches(list(self.client.scan_iter(match=self._p + b"*", count=1000))):
            n += self.client.delete(*keys)
        return n


def make_index(spec: str, *, prefix: str | None = None) -> KVIndex:
    """``"memory"`` -> :class:`InMemoryIndex`; ``"redis://host:port/db[?prefix=p]"`` (or
    ``rediss://``, ``unix://``) -> :class:`RedisIndex`."""
    if spec == "memory":
        return InMemoryIndex()
    if is_redis_url(spec):
        return RedisIndex.from_url(spec, prefix=prefix)
    raise InvalidRequestError(f"KV index spec {spec!r}: use 'memory' or a redis://host:port/db URL")
