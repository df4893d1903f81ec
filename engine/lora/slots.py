"""Fixed adapter slots in engine memory: pin counts and LRU eviction (pure policy, no torch).

A slot holds one adapter. A request pins its adapter's slot from admission until it stops
running (finished, aborted, prefill done); a pinned slot is never evicted, so every adapter a
scheduled batch needs is resident. :meth:`SlotTable.acquire` reuses the adapter's slot, else
takes an empty slot, else evicts the least recently used unpinned one, else returns None (the
caller keeps the request waiting).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Acquired:
    """Where ``name`` now lives: ``slot``; ``load`` True when its weights must be written there
    (``evicted``: the adapter that held the slot before, if any)."""

    slot: int
    load: bool
    evicted: str | None = None


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._name_at: list[str | None] = [None] * num_slots
        self._pins: list[int] = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident unpinned slots, oldest first

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def resident(self) -> list[str]:
        return [n for n in self._name_at if n is not None]

    def pins(self, name: str) -> int:
        s = self._slot_of.get(name)
        return 0 if s is None else self._pins[s]

    def num_pinned(self) -> int:
        """Slots pinned by running requests now."""
        return sum(1 for n in self._pins if n > 0)

    def can_acquire(self, name: str) -> bool:
        return name in self._slot_of or None in self._name_at or bool(self._lru)

    def acquire(self, name: str) -> Acquired | None:
        """Pin ``name``'s slot (placing it first if needed); None when every slot is pinned."""
        s = self._slot_of.get(name)
        if s is not None:
            self._pin(s)
            return Acquired(s, load=False)
        evicted = None
        if None in self._name_at:
            s = self._name_at.index(None)
        elif self._lru:
            s = next(iter(self._lru))
            evicted = self._name_at[s]
            del self._slot_of[evicted]
        else:
            return None
        self._name_at[s] = name
        self._slot_of[name] = s
        self._pin(s)
        return Acquired(s, load=True, evicted=evicted)

    def undo_place(self, name: str) -> None:
        """Forget a placement whose weights could not be written (the slot becomes empty)."""
        s = self._slot_of.pop(name)
        self._name_at[s] = None
        self._pins[s] = 0
        self._lru.pop(s, None)

    def release(self, name: str) -> None:
        s = self._slot_of.get(name)
        if s is None or self._pins[s] == 0:
            raise RuntimeError(f"LoRA adapter {name!r} released more often than acquired")
        self._pins[s] -= 1
        if self._pins[s] == 0:
            self._lru[s] = None  # most recently used at the end

    def _pin(self, s: int) -> None:
        self._pins[s] += 1
        self._lru.pop(s, None)


FULL_WINDOW = 32
"""Full periods :class:`FullPeriods`' running mean weighs (an exponential mean over about this
many once it has seen them: slot turnover changes with the load)."""


class FullPeriods:
    """How long a full slot table (every slot pinned) stays full, measured on a caller's clock:
    call :meth:`acquired` after each pin and :meth:`released` after each unpin. :attr:`mean_s` is
    the running mean of the periods from "every slot pinned" to the release that frees a slot:
    the expected wait for a slot of a request whose adapter is not in one (the router prices it,
    ``router.policy.adapter_cost``; 0 until one period was seen)."""

    def __init__(self, window: int = FULL_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.mean_s = 0.0
        self.samples = 0
        self._since: float | None = None

    def acquired(self, table: SlotTable, now: float) -> None:
        if self._since is None and table.num_pinned() >= table.num_slots:
            self._since = now

    def released(self, table: SlotTable, now: float | None) -> None:
        """After an unpin; ``now`` None: end a full period without measuring it."""
        since = self._since
        if since is None or table.num_pinned() >= table.num_slots:
            return
        self._since = None
        if now is not None:
            self.samples += 1
            self.mean_s += (max(0.0, now - since) - self.mean_s) / min(self.samples, self.window)
