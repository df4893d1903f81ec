"""What a LoRA adapter costs a request before its prefill can start on an instance (pure).

A worker's load report says where each adapter is (an engine slot, host memory, neither: disk)
and how its adapter tiers are busy; :func:`adapter_ready_s` turns that into seconds, the term
placement adds to a candidate's predicted TTFT (``InstanceView.adapter_load_s``):

* **load**: nothing when the adapter is in an engine slot (a request shares its slot even while
  other requests pin it), a host -> slot copy (``slot_load_s``) when it is in host memory, a
  disk read and the copy otherwise;
* **queued reads**: disk reads run one at a time (the engine's one loader thread), so a read
  waits for the ``reads_queued`` reads ahead of it (``disk_load_s`` each);
* **slot wait**: when the adapter is not in a slot and every slot is pinned by running requests
  of other adapters, the request waits outside the scheduler for a slot to be released, behind
  the ``slot_waiters`` requests already waiting for one: ``(slot_waiters + 1) * slot_free_s``
  with ``slot_free_s`` the worker's measured mean time a full slot table stays full (the wait of
  the first in line; 0 when never measured). A disk read overlaps that wait (the read runs in the
  background), so the longer of the two counts, then the copy.

Unknown fields are 0 (an older worker's report): the cost is then the load alone, as before.

:func:`affinity_order` is the adapter-affinity candidate order (ready time, then load); the
cache-aware policies break a tie of predicted TTFT by the same key
(``router.policy.placement.tie_break``), for the base model's requests too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.policy.view import InstanceView


@dataclass(frozen=True)
class AdapterTiers:
    """One instance's adapter state as its worker reports it (heartbeat ``LoadReport``).

    ``slots``: engine slots (``--max-loras``; 0: not reported); ``slots_pinned``: slots pinned by
    running requests now; ``slot_waiters``: requests waiting for a slot; ``slot_free_s``:
    measured mean time from "every slot pinned" to a slot's release; ``reads_queued``: disk reads
    under way or queued on the loader. Load times are measured running means (0: not yet)."""

    in_slot: frozenset[str] = field(default_factory=frozenset)
    in_host: frozenset[str] = field(default_factory=frozenset)
    slot_load_s: float = 0.0
    disk_load_s: float = 0.0
    slots: int = 0
    slots_pinned: int = 0
    slot_waiters: int = 0
    slot_free_s: float = 0.0
    reads_queued: int = 0

    def __post_init__(self) -> None:
        for name in ("slot_load_s", "disk_load_s", "slot_free_s"):
            v = getattr(self, name)
            if not v >= 0.0:  # NaN too
                raise ValueError(f"AdapterTiers.{name} must be >= 0, got {v}")
        for name in ("slots", "slots_pinned", "slot_waiters", "reads_queued"):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"AdapterTiers.{name} must be >= 0, got {v}")

    @property
    def all_pinned(self) -> bool:
        """Every slot is pinned by running requests (a new adapter waits for a release)."""
        return self.slots > 0 and self.slots_pinned >= self.slots


def slot_wait_s(t: AdapterTiers) -> float:
    """Expected wait for a free slot of a request whose adapter is not in one: 0 unless every
    slot is pinned, then one mean full period per request in line, this one included."""
    if not t.all_pinned:
        return 0.0
    return (t.slot_waiters + 1) * t.slot_free_s


def adapter_ready_s(adapter: str, t: AdapterTiers, read_left_s: float | None = None) -> float:
    """Seconds before a request for ``adapter`` can start its prefill on the instance ``t``
    describes (module docstring): 0 for the base model ("") or an adapter in a slot. ``read_left_s``:
    what is left of ``adapter``'s own read when it is already under way (None: not being read;
    it then queues behind ``reads_queued`` reads)."""
    if not adapter or adapter in t.in_slot:
        return 0.0
    if adapter in t.in_host:
        read = 0.0
    elif read_left_s is not None:
        read = read_left_s
    else:
        read = (t.reads_queued + 1) * t.disk_load_s
    return max(read, slot_wait_s(t)) + t.slot_load_s


def affinity_order(candidates: Sequence[InstanceView], adapter: str) -> list[InstanceView]:
    """Adapter-affinity candidate order for a request of ``adapter``: by seconds before the
    adapter is ready there (:meth:`InstanceView.adapter_load_s`: holders of a slot first), then
    least loaded (fewest queued prompt tokens, fewest requests, most free blocks); stable.

    A policy that takes the first of equally fast candidates then breaks a tie between holders
    of the adapter by load (``best_prefill_plan(least_loaded_ties=True)`` applies the same key
    to the tied candidates only): without it every request of a hot adapter,
    whose slot several instances hold at no cost, went to the first of them in view order, whose
    decode batch grew while the others idled (mean TTFT above least-loaded's in
    ``bench/sim_adapter_affinity.py``). The base model (``adapter`` empty) keeps the given order.
    """
    if not adapter:
        return list(candidates)

    def key(v: InstanceView) -> tuple[float, int, int, int]:
        return (
            v.adapter_load_s(adapter),
            v.queued_tokens,
            v.running_requests + v.queued_requests,
            -v.free_blocks,
        )

    return sorted(candidates, key=key)
