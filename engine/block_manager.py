"""Paged KV block accounting (vLLM PagedAttention), pure Python.

A :class:`BlockPool` owns ``num_blocks`` fixed-size blocks with reference counts. Free blocks sit
in an LRU queue; a free block that still holds a full, hashed block stays findable in the prefix
cache until it is reused (evicted) for new data. :class:`KVCacheManager` maps requests to block
tables, reuses cached prefixes and registers newly filled blocks.

Invariants (checked by tests): every block is either referenced (``ref_cnt > 0``) or in the free
queue, never both; ``num_free_blocks + sum(referenced) == num_blocks``; a block's hash is set only
while its content is exactly the keyed tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.block_hash import BlockHash, chain_hashes
from engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found
    evictions: int = 0  # cached blocks overwritten

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """Fixed set of blocks, LRU free queue, hash -> block map of cached blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash) -> Block | None:
        bid = self._cached.get(block_hash)
        return None if bid is None else self.blocks[bid]

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` blocks from the LRU end of the free queue (evicting their cache entries)."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                if self._cached.get(blk.block_hash) == bid:
                    del self._cached[blk.block_hash]
                blk.block_hash = None
                self.stats.evictions += 1
            blk.ref_cnt = 1
            out.append(blk)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the cache (removing them from the free queue)."""
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self._free[blk.block_id]
            blk.ref_cnt += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching zero go to the MRU end of the free queue.

        Callers pass a request's blocks tail first so that a sequence's last blocks are evicted
        before its (more shareable) first blocks.
        """
        for blk in blocks:
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"block {blk.block_id} released more often than taken")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[blk.block_id] = None

    def register(self, blk: Block, block_hash: BlockHash) -> None:
        """Record that ``blk`` now holds exactly the block keyed ``block_hash``."""
        if blk.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is cached already; keep the first
        blk.block_hash = block_hash
        self._cached[block_hash] = blk.block_id

    def evict_all_cached(self) -> int:
        """Forget every free cached block (used by tests and by reset)."""
        n = 0
        for bid in list(self._free):
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                del self._cached[blk.block_hash]
                blk.block_hash = None
                n += 1
        return n


class KVCacheManager:
    """Block tables for requests; prefix reuse by chained block hashes.

    ``model_id`` is mixed into every block key (see :mod:`engine.block_hash`).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_id: str = "",
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[Block]] = {}
        self._num_registered: dict[str, int] = {}

    # ---------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    # ---------------------------------------------------------------- hashing
    def update_hashes(self, req: Request) -> None:
        """Extend ``req.block_hashes`` to cover every full block of its current tokens."""
        n_full = req.num_tokens // self.block_size
        have = len(req.block_hashes)
        if have >= n_full:
            return
        toks = req.token_slice(have * self.block_size, n_full * self.block_size)
        parent = req.block_hashes[-1] if have else None
        req.block_hashes.extend(
            chain_hashes(toks, self.block_size, self.model_id, req.adapter_id, req.cache_salt, parent=parent)
        )

    # ---------------------------------------------------------------- prefix cache
    def find_cached_prefix(self, req: Request) -> list[Block]:
        """Longest run of cached blocks matching the request's leading full blocks.

        At most ``(num_tokens - 1) // block_size`` blocks are returned so that at least one
        token is always computed (its logits are needed) and cached blocks are never written.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(req)
        limit = (req.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for h in req.block_hashes[:limit]:
            blk = self.pool.lookup(h)
            if blk is None:
                break
            hit.append(blk)
        self.pool.stats.queries += req.num_tokens
        self.pool.stats.hits += len(hit) * self.block_size
        return hit

    # ---------------------------------------------------------------- allocation
    def allocate_slots(self, req: Request, num_new_tokens: int, cached: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after any ``cached`` prefix).

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        table = self._tables.get(req.request_id)
        if not cached and table is not None:
            # fast path (a running request's next tokens): no cached prefix to reuse
            need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(table)
            if need > 0:
                if need > self.pool.num_free_blocks:
                    return False
                table.extend(self.pool.allocate(need))
            return True
        if table is None:
            table = []
        cached = cached or []
        have = len(table) + len(cached)
        num_computed = req.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - have
        # Cached blocks that are currently free will leave the free queue when touched.
        reclaim = sum(1 for b in cached if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaim:
            return False
        if cached:
            self.pool.touch(cached)
            table.extend(cached)
        if need > 0:
            table.extend(self.pool.allocate(need))
        self._tables[req.request_id] = table
        self._num_registered.setdefault(req.request_id, 0)
        if cached:
            self._num_registered[req.request_id] = max(
                self._num_registered[req.request_id], len(table) - need
            )
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = req.request_id
        done = self._num_registered.get(rid, 0)
        if req.num_computed_tokens // self.block_size <= done:
            return  # no newly completed block (the common case: checked before the table)
        table = self._tables.get(rid)
        if not table:
            return
        n_full = min(req.num_computed_tokens // self.block_size, len(table))
        if n_full <= done:
            return
        self.update_hashes(req)
        for i in range(done, n_full):
            self.pool.register(table[i], req.block_hashes[i])
        self._num_registered[req.request_id] = n_full

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first). Unknown ids are a no-op."""
        table = self._tables.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        if table:
            self.pool.release(reversed(table))

    def adopt_blocks(self, req: Request, num_tokens: int) -> list[int]:
        """Allocate fresh blocks to hold ``num_tokens`` imported tokens; return their ids.

        Used by the decode role: the caller copies KV bytes into the returned blocks and then
        sets ``req.num_computed_tokens = num_tokens``. Raises if the pool is short.
        """
        if req.request_id in self._tables:
            raise RuntimeError(f"request {req.request_id} already holds blocks")
        n = self.blocks_needed(num_tokens)
        if n > self.pool.num_free_blocks:
            raise RuntimeError(f"need {n} blocks, {self.pool.num_free_blocks} free")
        blocks = self.pool.allocate(n)
        self._tables[req.request_id] = blocks
        self._num_registered[req.request_id] = 0
        return [b.block_id for b in blocks]

    def cached_prefix_len(self, hashes: list[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` are in this pool's prefix cache."""
        n = 0
        while n < len(hashes) and self.pool.lookup(hashes[n]) is not None:
            n += 1
        return n

    def insert_cached(self, hashes: list[BlockHash], fill: Callable[[list[int]], None]) -> int:
        """Add blocks fetched from elsewhere to the prefix cache.

        Allocates one block per hash (as many as are free), lets ``fill(block_ids)`` write their KV,
        registers the hashes and returns the blocks to the free queue (MRU end), where later
        requests find them like any locally computed prefix. Returns how many were inserted.
        """
        n = min(len(hashes), self.pool.num_free_blocks)
        if n == 0 or not self.enable_prefix_caching:
            return 0
        blocks = self.pool.allocate(n)
        try:
            fill([b.block_id for b in blocks])
            for b, h in zip(blocks, hashes, strict=False):
                self.pool.register(b, h)
        finally:
            self.pool.release(reversed(blocks))
        return n
