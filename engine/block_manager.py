"""Paged KV block accounting (vLLM PagedAttention), pure Python.

A :class:`BlockPool` owns ``num_blocks`` fixed-size blocks with reference counts. Free blocks sit
in an LRU queue; a free block that still holds a full, hashed block stays findable in the prefix
cache until it is reused (evicted) for new data. :class:`KVCacheManager` maps requests to block
tables, reuses cached prefixes and registers newly filled blocks.

Invariants (checked by tests): every block is either referenced (``ref_cnt > 0``) or in the free
queue, never both; ``num_free_blocks + sum(referenced) == num_blocks``; a block's hash is set only
while its content is exactly the keyed tokens.

Sliding window (``sliding_window`` = W, set only when **every** layer of the model is windowed:
a full-attention layer still reads every block, so a model with any global layer keeps them
all): once ``N`` tokens of a request are in cache, its next queries (positions ``>= N``) attend
only to keys ``> N - W``, so its leading ``max(0, N - W + 1) // block_size`` blocks are never
read again. They are dropped from the request (vLLM's sliding-window manager) when it is next
allocated: the table keeps a hole (``None``; :data:`NULL_BLOCK` in :meth:`block_table`), and the
block loses this request's reference: a block another request shares stays; one reaching zero
goes to the free queue, still findable by its hash (prefix cache, LRU) until reused. A
sequence therefore holds at most ``W // block_size + 2`` blocks while it decodes. Requests with
``prefill_only`` keep every block until export (the handoff ships the whole prompt's KV); the
decode side adopts only the blocks still inside the window. A windowed prefix-cache lookup needs
only the blocks a continuation can attend to (the window before the hit point), not the whole
prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.block_hash import BlockHash, chain_hashes
from engine.request import Request

NULL_BLOCK = -1  # block_table() entry of a block dropped out of the sliding window (never read)


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
    ``sliding_window``: see the module docstring (None: keep every block).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_id: str = "",
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[Block | None]] = {}
        self._num_registered: dict[str, int] = {}
        self._num_skipped: dict[str, int] = {}  # leading blocks dropped out of the window

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
        """Block ids of the request's logical blocks; :data:`NULL_BLOCK` for dropped ones."""
        return [NULL_BLOCK if b is None else b.block_id for b in self._tables.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request references now (its table minus dropped out-of-window blocks)."""
        return sum(1 for b in self._tables.get(request_id, ()) if b is not None)

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    # ---------------------------------------------------------------- sliding window
    def num_skippable_blocks(self, num_computed: int, prefill_only: bool = False) -> int:
        """Leading blocks no query at a position ``>= num_computed`` can attend to (0 without a
        window, and for prefill-only requests, which keep their blocks for export)."""
        if self.sliding_window is None or prefill_only:
            return 0
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def _drop_out_of_window(self, req: Request, table: list[Block | None], num_computed: int) -> None:
        """Release the request's blocks that fell wholly out of the window (see module doc)."""
        skip = self.num_skippable_blocks(num_computed, req.prefill_only)
        done = self._num_skipped.get(req.request_id, 0)
        if skip <= done:
            return
        freed = [b for b in table[done:skip] if b is not None]
        for i in range(done, skip):
            table[i] = None
        self._num_skipped[req.request_id] = skip
        if freed:
            self.pool.release(reversed(freed))

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
        With a sliding window, a hit of ``k`` blocks needs only the blocks the continuation can
        attend to (from ``num_skippable_blocks(k * block_size)``); the leading ones are returned
        as ``None`` (never read, never referenced).
        """
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(req)
        limit = (req.num_tokens - 1) // self.block_size
        hit: list[Block | None] = []
        if self.sliding_window is None or req.prefill_only:
            for h in req.block_hashes[:limit]:
                blk = self.pool.lookup(h)
                if blk is None:
                    break
                hit.append(blk)
        else:
            found: list[Block | None] = []
            run_start = best = 0  # run_start: first block of the current run of cached blocks
            for i, h in enumerate(req.block_hashes[:limit]):
                blk = self.pool.lookup(h)
                found.append(blk)
                if blk is None:
                    run_start = i + 1
                elif run_start <= self.num_skippable_blocks((i + 1) * self.block_size):
                    best = i + 1
            skip = self.num_skippable_blocks(best * self.block_size)
            hit = [None] * skip + found[skip:best]
        self.pool.stats.queries += req.num_tokens
        self.pool.stats.hits += len(hit) * self.block_size
        return hit

    # ---------------------------------------------------------------- allocation
    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached: list[Block | None] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after any ``cached`` prefix),
        first dropping the blocks that fell out of the sliding window.

        Returns False when the pool cannot supply the blocks (having changed nothing but the
        dropping of out-of-window blocks, which is due anyway).
        """
        table = self._tables.get(req.request_id)
        if not cached and table is not None:
            # fast path (a running request's next tokens): no cached prefix to reuse
            if self.sliding_window is not None:
                self._drop_out_of_window(req, table, req.num_computed_tokens)
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
        live = [b for b in cached if b is not None]  # None: out of the window (see find_cached_prefix)
        # Cached blocks that are currently free will leave the free queue when touched.
        reclaim = sum(1 for b in live if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaim:
            return False
        if cached:
            self.pool.touch(live)
            table.extend(cached)
        if need > 0:
            table.extend(self.pool.allocate(need))
        self._tables[req.request_id] = table
        self._num_registered.setdefault(req.request_id, 0)
        if cached:
            self._num_registered[req.request_id] = max(
                self._num_registered[req.request_id], len(table) - need
            )
            self._num_skipped.setdefault(req.request_id, len(cached) - len(live))
        if self.sliding_window is not None:
            self._drop_out_of_window(req, table, num_computed)
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
            blk = table[i]
            if blk is not None:  # None: dropped out of the window
                self.pool.register(blk, req.block_hashes[i])
        self._num_registered[req.request_id] = n_full

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first). Unknown ids are a no-op."""
        table = self._tables.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._num_skipped.pop(request_id, None)
        if table:
            self.pool.release(b for b in reversed(table) if b is not None)

    def adopt_blocks(self, req: Request, num_tokens: int) -> list[int]:
        """Allocate fresh blocks to hold ``num_tokens`` imported tokens; return their ids.

        Used by the decode role: the caller copies KV bytes into the returned blocks and then
        sets ``req.num_computed_tokens = num_tokens``. Raises if the pool is short. With a
        sliding window only the logical blocks ``[num_skippable_blocks(num_tokens), n)`` are
        allocated (and returned, in order): the leading ones are out of the window already.
        """
        if req.request_id in self._tables:
            raise RuntimeError(f"request {req.request_id} already holds blocks")
        n = self.blocks_needed(num_tokens)
        skip = self.num_skippable_blocks(num_tokens, req.prefill_only)
        if n - skip > self.pool.num_free_blocks:
            raise RuntimeError(f"need {n - skip} blocks, {self.pool.num_free_blocks} free")
        blocks = self.pool.allocate(n - skip)
        self._tables[req.request_id] = [None] * skip + blocks
        self._num_registered[req.request_id] = 0
        self._num_skipped[req.request_id] = skip
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
