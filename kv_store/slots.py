"""Fixed-size slot allocation (pure): which arena slots are free.

:class:`SlotAllocator` is the seam between the store's bookkeeping (:mod:`kv_store.node`) and the
memory that holds blocks (:mod:`kv_store.arena`); :class:`SlotPool` is the in-memory allocator both
use.
"""

from __future__ import annotations

from typing import Protocol


class SlotAllocator(Protocol):
    @property
    def capacity(self) -> int: ...

    def alloc(self) -> int | None:
        """A free slot index in ``[0, capacity)``, or None when all are taken."""
        ...

    def free(self, slot: int) -> None:
        """Return a slot obtained from :meth:`alloc`; freeing a free slot raises ValueError."""
        ...


class SlotPool:
    """Free list of ``capacity`` slots; lowest index first (keeps the used part of an arena compact)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"slot capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)
