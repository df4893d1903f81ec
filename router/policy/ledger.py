"""The goodput policy's in-flight ledger: the requests it admitted, until they finish or expire.

Pure bookkeeping, no I/O: per-tenant counts (quotas), per-decode-instance long requests
(TetriInfer's spreading), the earliest predicted finish (retry-after), and each decode instance's
**stall room** (#19): a prefill run on a decode instance (conditional disaggregation) holds up
every decode step there for its duration, and a request's measured TPOT is the mean over its
whole decode, so a stall of ``s`` seconds adds ``s / (output tokens - 1)`` to the TPOT of every
request decoding there. Each admitted request with a TPOT SLO records how many seconds of
stall it can absorb (its budget); :meth:`Ledger.stall_room` is the least budget left among the
requests on an instance, and :meth:`Ledger.stall` charges a placed local prefill to all of them.
Measured on the README's bench (#19): 1 s local prefills of 256-token prompts on the busy decode
worker made 2-token requests' TPOT 730-770 ms against a 200 ms SLO.

Upkeep per decision does not grow with the ledger: expiry, earliest finish and each instance's
least stall budget come from heaps with lazy deletion (stale items of removed entries are skipped,
heaps rebuilt when mostly stale).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass
class Inflight:
    request_id: str
    tenant: str
    decode_id: str
    long: bool
    ttft_base_s: float  # uncorrected model predictions (online correction compares to these)
    tpot_base_s: float
    predicted_finish: float
    expires_at: float
    seq: int = 0  # this entry's heap key (a re-placed id gets a new entry and seq)
    ttft_slo_s: float = math.inf  # the request's TTFT SLO (inf: none)
    # Seconds of stall (decode steps held up by a prefill run on its decode instance) the request
    # tolerates over its whole decode and still meets its TPOT limit: (limit - predicted TPOT) x
    # (output tokens - 1) at admission (inf: no TPOT SLO). See Ledger.stall_room.
    stall_budget_s: float = math.inf
    stall_key: float = math.inf  # stall_budget_s + the instance's stall counter at admission


class Ledger:
    """The in-flight requests of :class:`GoodputAwarePolicy`, with per-decision upkeep that does
    not grow with the ledger: expiry and the earliest predicted finish come from heaps (stale
    items of removed entries are skipped, and the heaps are rebuilt when mostly stale), per-tenant
    entries and per-decode counts of long requests are kept as entries come and go."""

    def __init__(self) -> None:
        self.entries: dict[str, Inflight] = {}
        self._by_expiry: list[tuple[float, int, str]] = []
        self._by_finish: list[tuple[float, int, str]] = []
        self._tenants: dict[str, dict[str, Inflight]] = {}
        self.longs: dict[str, int] = {}  # decode instance -> long requests in flight there
        self._seq = 0
        # decode instance -> seconds of stall charged since it last had no budgeted request, and
        # a heap of (stall_key, seq, request id) of its budgeted requests (the least key first)
        self._stalled: dict[str, float] = {}
        self._budgets: dict[str, list[tuple[float, int, str]]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, e: Inflight) -> None:
        self.pop(e.request_id)
        self._seq += 1
        e.seq = self._seq
        self.entries[e.request_id] = e
        self._tenants.setdefault(e.tenant, {})[e.request_id] = e
        if e.long:
            self.longs[e.decode_id] = self.longs.get(e.decode_id, 0) + 1
        heapq.heappush(self._by_expiry, (e.expires_at, e.seq, e.request_id))
        heapq.heappush(self._by_finish, (e.predicted_finish, e.seq, e.request_id))
        if math.isfinite(e.stall_budget_s):
            heap = self._budgets.get(e.decode_id)
            if heap is None or not self._top(heap):
                heap = self._budgets[e.decode_id] = []
                self._stalled[e.decode_id] = 0.0
            e.stall_key = e.stall_budget_s + self._stalled[e.decode_id]
            heapq.heappush(heap, (e.stall_key, e.seq, e.request_id))

    def pop(self, request_id: str) -> Inflight | None:
        e = self.entries.pop(request_id, None)
        if e is None:
            return None
        mine = self._tenants[e.tenant]
        del mine[request_id]
        if not mine:
            del self._tenants[e.tenant]
        if e.long:
            n = self.longs[e.decode_id] - 1
            if n:
                self.longs[e.decode_id] = n
            else:
                del self.longs[e.decode_id]
        return e

    def _live(self, item: tuple[float, int, str]) -> bool:
        e = self.entries.get(item[2])
        return e is not None and e.seq == item[1]

    def expire(self, now: float) -> None:
        """Drop every entry with ``expires_at <= now``."""
        h = self._by_expiry
        while h and h[0][0] <= now:
            _, seq, rid = heapq.heappop(h)
            e = self.entries.get(rid)
            if e is not None and e.seq == seq:
                self.pop(rid)
        f = self._by_finish
        while f and not self._live(f[0]):
            heapq.heappop(f)
        limit = 2 * len(self.entries) + 64
        if len(h) > limit:
            self._by_expiry = [i for i in h if self._live(i)]
            heapq.heapify(self._by_expiry)
        if len(f) > limit:
            self._by_finish = [i for i in f if self._live(i)]
            heapq.heapify(self._by_finish)

    def earliest_finish(self) -> float | None:
        """The earliest predicted finish of an entry (None: empty)."""
        f = self._by_finish
        while f and not self._live(f[0]):
            heapq.heappop(f)
        return f[0][0] if f else None

    def of_tenant(self, tenant: str) -> list[Inflight]:
        return list(self._tenants.get(tenant, {}).values())

    def count(self, tenant: str | None = None) -> int:
        if tenant is None:
            return len(self.entries)
        return len(self._tenants.get(tenant, ()))

    # ------------------------------------------------------------------ stall room (#19)
    def _top(self, heap: list[tuple[float, int, str]]) -> tuple[float, int, str] | None:
        """The least live item of a budget heap (stale items popped); None when none is live."""
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if len(heap) > 64 and len(heap) > 2 * len(self.entries):
            heap[:] = [i for i in heap if self._live(i)]
            heapq.heapify(heap)
        return heap[0] if heap else None

    def stall_room(self, decode_id: str) -> float:
        """Seconds of stall the requests decoding on ``decode_id`` can still absorb within their
        TPOT limits: the least budget left among them (inf: none there has a TPOT SLO; may be
        negative once they are over)."""
        heap = self._budgets.get(decode_id)
        if heap is None:
            return math.inf
        top = self._top(heap)
        if top is None:
            del self._budgets[decode_id]
            del self._stalled[decode_id]
            return math.inf
        return top[0] - self._stalled[decode_id]

    def stall(self, decode_id: str, seconds: float) -> None:
        """Charge a stall of ``seconds`` (a prefill placed on ``decode_id``) to every request
        decoding there. No-op when none there has a budget."""
        if seconds < 0:
            raise ValueError(f"a stall is >= 0 seconds, got {seconds}")
        if decode_id in self._stalled:
            self._stalled[decode_id] += seconds
