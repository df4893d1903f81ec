"""Shared-memory arena: fixed-size slots in one POSIX shared-memory segment.

The store node process *owns* an :class:`ShmArena` (creates it, writes blocks into slots, unlinks
it on close). A reader on the same host *attaches* with :class:`ArenaReader` by name and gets
zero-copy memoryviews of slots; it must only read slots it holds a lease on (the node never reuses
a leased slot) and must not write.

Implementation note: this is the mechanism of ``multiprocessing.shared_memory`` (``shm_open`` +
``mmap`` via the stdlib's ``_posixshmem``), used directly for two reasons: (1) on Python < 3.13
``SharedMemory`` registers *attaching* processes with the resource tracker, which then unlinks the
owner's segment (and warns) when the reader exits; (2) ``SharedMemory.__del__`` raises when a view
is still alive. The owner does register its segment with the resource tracker, so a crashed owner
does not leak it.

Pages are touched at creation (``prefault``) so that the first block written does not pay page
faults, and readers map with ``MAP_POPULATE`` for the same reason.

:class:`HeapArena` has the same interface in private memory: the fake for tests and the fallback
where /dev/shm is too small.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os
import socket
import uuid
from multiprocessing import resource_tracker

import numpy as np

from kv_store.slots import SlotPool

_SHM_PREFIX = "pdkv_"


def host_id() -> str:
    """Identity of this shared-memory domain: processes with equal host ids can attach each
    other's arenas (same kernel boot and same /dev/shm mount, so containers that do not share
    /dev/shm get different ids). ``PDSERVE_HOST_ID`` overrides it (tests simulate several hosts on
    one machine with it: see pdserve/ray_actors.py)."""
    override = os.environ.get("PDSERVE_HOST_ID")
    if override:
        return override
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()[:8]
    dev = ""
    with contextlib.suppress(OSError):
        dev = str(os.stat("/dev/shm").st_dev)
    return f"{socket.gethostname()}/{boot}/{dev}"


class _Mapping:
    """A memory mapping with a close that tolerates live views (they keep it alive instead)."""

    def __init__(self, mm: mmap.mmap | bytearray) -> None:
        self._mm: mmap.mmap | bytearray | None = mm
        self.buf: memoryview | None = memoryview(mm)
        self.nbytes = len(mm)

    def slot(self, slot: int, slot_nbytes: int, count: int = 1) -> memoryview:
        """View of ``count`` consecutive slots starting at ``slot``."""
        if self.buf is None:
            raise ValueError("arena is closed")
        if slot < 0 or count < 1 or (slot + count) * slot_nbytes > self.nbytes:
            raise IndexError(
                f"slots [{slot}, {slot + count}) out of range for an arena of {self.nbytes} bytes"
            )
        start = slot * slot_nbytes
        return self.buf[start : start + count * slot_nbytes]

    def close(self) -> bool:
        """Unmap; returns False if views are still alive (the mapping then lives until they die)."""
        if self._mm is None:
            return True
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        mm, self._mm = self._mm, None
        if isinstance(mm, mmap.mmap):
            try:
                mm.close()
            except BufferError:
                return False
        return True


class ShmArena:
    """Owner side: ``capacity`` slots of ``slot_nbytes`` in a new shared-memory segment.

    Also a :class:`kv_store.slots.SlotAllocator` (``alloc``/``free``/``capacity``).
    """

    def __init__(self, slot_nbytes: int, capacity: int, *, name: str | None = None, prefault: bool = True):
        if slot_nbytes < 1 or capacity < 1:
            raise ValueError("slot_nbytes and capacity must be >= 1")
        self.slot_nbytes = slot_nbytes
        self.nbytes = slot_nbytes * capacity
        self.name = name or f"{_SHM_PREFIX}{uuid.uuid4().hex[:20]}"
        self._slots = SlotPool(capacity)
        fd = _posixshmem.shm_open("/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        self._unlinked = False
        try:
            os.ftruncate(fd, self.nbytes)
            mm = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink("/" + self.name)
            raise
        os.close(fd)  # the mapping keeps the segment alive
        resource_tracker.register("/" + self.name, "shared_memory")
        self._map = _Mapping(mm)
        if prefault:
            pages = np.frombuffer(mm, dtype=np.uint8)
            pages[:: mmap.PAGESIZE] = 0  # one write per page faults it in
            del pages

    # SlotAllocator
    @property
    def capacity(self) -> int:
        return self._slots.capacity

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    def alloc(self) -> int | None:
        return self._slots.alloc()

    def free(self, slot: int) -> None:
        self._slots.free(slot)

    def view(self, slot: int) -> memoryview:
        """Writable zero-copy view of one slot (valid until :meth:`close`)."""
        return self._map.slot(slot, self.slot_nbytes)

    def close(self) -> None:
        """Unmap and unlink the segment (idempotent). Readers' existing mappings stay valid;
        new attaches fail."""
        self._map.close()
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + self.name)
            resource_tracker.unregister("/" + self.name, "shared_memory")

    def __enter__(self) -> ShmArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeapArena:
    """:class:`ShmArena` in private memory (``name`` is empty: not attachable). Fake and fallback."""

    def __init__(self, slot_nbytes: int, capacity: int) -> None:
        if slot_nbytes < 1 or capacity < 1:
            raise ValueError("slot_nbytes and capacity must be >= 1")
        self.slot_nbytes = slot_nbytes
        self.nbytes = slot_nbytes * capacity
        self.name = ""
        self._slots = SlotPool(capacity)
        self._map = _Mapping(bytearray(self.nbytes))

    @property
    def capacity(self) -> int:
        return self._slots.capacity

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    def alloc(self) -> int | None:
        return self._slots.alloc()

    def free(self, slot: int) -> None:
        self._slots.free(slot)

    def view(self, slot: int) -> memoryview:
        return self._map.slot(slot, self.slot_nbytes)

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> HeapArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArenaReader:
    """Reader side: attach to an arena by name (same host). Never unlinks; not tracked.

    Raises FileNotFoundError if no such segment exists (owner gone, or not the same host).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.nbytes = size
        self._map = _Mapping(mm)

    def view(self, slot: int, slot_nbytes: int, count: int = 1) -> memoryview:
        """Zero-copy view of ``count`` consecutive slots from ``slot``; valid while they are leased
        and the reader is open."""
        return self._map.slot(slot, slot_nbytes, count)

    def close(self) -> bool:
        """Unmap; False if views are still alive (then the mapping lives until they are dropped)."""
        return self._map.close()

    def __enter__(self) -> ArenaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
