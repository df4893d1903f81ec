"""Host-memory KV block pool accounting (vLLM's swap space). Pure: ids only, no tensors.

The host pool has ``num_blocks`` slots of one KV block each; the tensors behind them are
:class:`engine.swap_space.HostKVCache`'s (pinned host memory on CUDA, a pre-allocated tensor on
CPU). A slot is either free or held by exactly one swapped-out request: blocks shared between
requests are never copied to the host (see ``KVCacheManager.swap_out``), so no reference counts
are needed here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class HostBlockPool:
    """Free list of host block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host block pool needs >= 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free host blocks; raises RuntimeError when fewer are free (nothing taken)."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} host blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, ids: Iterable[int]) -> None:
        """Return host blocks; freeing one that is not held raises RuntimeError."""
        for i in ids:
            if i not in self._used:
                raise RuntimeError(f"host block {i} freed but not held")
            self._used.remove(i)
            self._free.append(i)
