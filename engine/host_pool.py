"""Host-memory KV block pool accounting (vLLM's swap space). Pure: ids only, no tensors.

The host pool has ``num_blocks`` slots of one KV block each; the tensors behind them are
:class:`engine.swap_space.HostKVCache`'s (pinned host memory on CUDA, a pre-allocated tensor on
CPU). A slot has a reference count: a block shared by several swapped-out requests (a prefix
cache hit) is copied to the host once and referenced by each (see ``KVCacheManager.swap_out``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class HostBlockPool:
    """Free list and reference counts of host block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host block pool needs >= 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._ref)

    def ref_cnt(self, host_id: int) -> int:
        return self._ref.get(host_id, 0)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free host blocks (one reference each); raises RuntimeError when fewer are
        free (nothing taken)."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} host blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for i in out:
            self._ref[i] = 1
        return out

    def incref(self, host_id: int) -> None:
        if host_id not in self._ref:
            raise RuntimeError(f"host block {host_id} referenced but not held")
        self._ref[host_id] += 1

    def free(self, ids: Iterable[int]) -> None:
        """Drop one reference each; a block reaching zero is free again. Dropping a reference
        to a block that is not held raises RuntimeError."""
        for i in ids:
            n = self._ref.get(i)
            if n is None:
                raise RuntimeError(f"host block {i} freed but not held")
            if n > 1:
                self._ref[i] = n - 1
            else:
                del self._ref[i]
                self._free.append(i)
