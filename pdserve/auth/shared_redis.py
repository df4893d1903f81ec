"""The Redis backend of the routers' shared tenant state (:mod:`pdserve.auth.shared_state`).

Keys (``prefix`` default ``pdserve:edge:``; ``T`` a tenant key, ``C`` a claim key, both opaque
digests; ``R`` a router instance id):

* ``{prefix}router:R``: ``1`` with TTL ``liveness_ttl_s``: router R is alive.
* ``{prefix}inflight:T``: hash R -> R's requests of T in flight; TTL ``entry_ttl_s`` (renewed by
  each write and by R's periodic sync). Admission sums the fields of live routers and deletes
  the fields of dead ones.
* ``{prefix}rate:T:RATE:BURST``: the token bucket (``tokens``, ``ts`` in ms of the Redis server's
  clock); TTL: the time to refill, plus a second. A tenant whose policy changes gets a new bucket.
* ``{prefix}claim:C``: ``R|CLUSTER_ID``; TTL ``entry_ttl_s`` (renewed by R's sync).

Every operation is one Lua script (atomic on the server; scripts read the clock with ``TIME``,
which needs Redis >= 5, effects replication). The scripts touch router liveness keys they
compute, so a Redis Cluster (keys on several shards) is not supported: use one Redis (with
replicas) for the routers' shared state.
"""

from __future__ import annotations

from typing import Any

from pdserve.auth.shared_state import DEFAULT_PREFIX, AdmitResult, ClaimOutcome, SharedStateError

_BEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return existed
"""

# KEYS: inflight hash, rate bucket. ARGV: router, max_inflight (-1: none), rate (-1: none), burst,
# entry ttl ms, router liveness key prefix. Returns {admitted, inflight before, retry_after_s as text}
_ADMIT = """
local me, maxf, rate = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, ttl, rp = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local total = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  local f, n = h[i], tonumber(h[i + 1])
  if f == me or redis.call('EXISTS', rp .. f) == 1 then
    total = total + n
  else
    redis.call('HDEL', KEYS[1], f)
  end
end
if maxf >= 0 and total >= maxf then
  return {0, total, '0'}
end
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil or ts == nil then
    tokens, ts = burst, now
  end
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
    ts = now
  end
  if tokens < 1 then
    return {0, total, tostring((1 - tokens) / rate)}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
end
redis.call('HINCRBY', KEYS[1], me, 1)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, total, '0'}
"""

_RELEASE = """
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if c <= 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
return c
"""

_INFLIGHT = """
local total = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if redis.call('EXISTS', ARGV[1] .. h[i]) == 1 then
    total = total + tonumber(h[i + 1])
  end
end
return total
"""

# KEYS: claim. ARGV: router, cluster id, ttl ms, liveness key prefix, replace_own (1/0).
# Returns 0 claimed, 1 held here, 2 held by another live router.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then
  local owner = string.match(v, '^([^|]*)|')
  if owner == ARGV[1] then
    if ARGV[5] ~= '1' then
      return 1
    end
  elseif owner and redis.call('EXISTS', ARGV[4] .. owner) == 1 then
    return 2
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 0
"""

_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_CLAIM_OUTCOMES = {0: ClaimOutcome.CLAIMED, 1: ClaimOutcome.HELD_HERE, 2: ClaimOutcome.HELD_ELSEWHERE}


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisSharedBackend:
    """:class:`pdserve.auth.shared_state.SharedBackend` on one Redis (see the module docstring).
    ``client``: a ``redis.Redis`` (bytes replies); every Redis error becomes
    :class:`SharedStateError`."""

    def __init__(self, client: Any, prefix: str = DEFAULT_PREFIX, name: str = "redis") -> None:
        self.client = client
        self.prefix = prefix
        self.name = name
        self._beat = client.register_script(_BEAT)
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._inflight = client.register_script(_INFLIGHT)
        self._claim = client.register_script(_CLAIM)
        self._unclaim = client.register_script(_UNCLAIM)

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 0.5) -> RedisSharedBackend:
        """Open ``url`` through :func:`pdserve.redis_access.connect` (password, TLS, the secure
        defaults); ``timeout_s`` bounds each command (the router's event loop waits on it)."""
        from pdserve.redis_access import connect, shown

        client = connect(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, prefix=prefix, name=f"Redis {shown(url)}")

    # ------------------------------------------------------------------ keys
    def _router(self, router: str) -> str:
        return f"{self.prefix}router:{router}"

    def _hash(self, tenant: str) -> str:
        return f"{self.prefix}inflight:{tenant}"

    def _claim_key(self, claim: str) -> str:
        return f"{self.prefix}claim:{claim}"

    def _run(self, fn: Any, **kw: Any) -> Any:
        import redis

        try:
            return fn(**kw)
        except redis.RedisError as e:
            raise SharedStateError(f"{type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ SharedBackend
    def beat(self, router: str, ttl_s: float) -> bool:
        return bool(self._run(self._beat, keys=[self._router(router)], args=[_ms(ttl_s)]))

    def admit(
        self, tenant: str, router: str, max_inflight: int | None, rate: float | None, burst: int, ttl_s: float
    ) -> AdmitResult:
        bucket = f"{self.prefix}rate:{tenant}:{rate!r}:{burst}"
        args = [
            router,
            -1 if max_inflight is None else max_inflight,
            -1 if rate is None else repr(float(rate)),
            burst,
            _ms(ttl_s),
            self.prefix + "router:",
        ]
        ok, total, wait = self._run(self._admit, keys=[self._hash(tenant), bucket], args=args)
        return AdmitResult(bool(ok), int(total), float(wait))

    def release(self, tenant: str, router: str) -> None:
        self._run(self._release, keys=[self._hash(tenant)], args=[router])

    def inflight(self, tenant: str) -> int:
        return int(self._run(self._inflight, keys=[self._hash(tenant)], args=[self.prefix + "router:"]))

    def claim(
        self, claim: str, router: str, cluster_id: str, ttl_s: float, replace_own: bool
    ) -> ClaimOutcome:
        args = [router, cluster_id, _ms(ttl_s), self.prefix + "router:", "1" if replace_own else "0"]
        return _CLAIM_OUTCOMES[int(self._run(self._claim, keys=[self._claim_key(claim)], args=args))]

    def unclaim(self, claim: str, router: str, cluster_id: str) -> None:
        self._run(self._unclaim, keys=[self._claim_key(claim)], args=[f"{router}|{cluster_id}"])

    def sync(self, router: str, counts: dict[str, int], claims: dict[str, str], ttl_s: float) -> None:
        ms = _ms(ttl_s)

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for tenant, n in counts.items():
                if n > 0:
                    pipe.hset(self._hash(tenant), router, n)
                    pipe.pexpire(self._hash(tenant), ms)
                else:
                    pipe.hdel(self._hash(tenant), router)
            for claim, cid in claims.items():
                k = self._claim_key(claim)
                pipe.set(k, f"{router}|{cid}", px=ms, nx=True)  # re-taken where it was dropped
                pipe.pexpire(k, ms)
            pipe.execute()

        self._run(run)

    def leave(self, router: str, tenants: list[str], claims: dict[str, str]) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for tenant in tenants:
                pipe.hdel(self._hash(tenant), router)
            pipe.execute()
            for claim, cid in claims.items():
                self._unclaim(keys=[self._claim_key(claim)], args=[f"{router}|{cid}"])
            self.client.delete(self._router(router))

        self._run(run)
