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

Swap (``num_host_blocks`` > 0, :mod:`engine.host_pool`): :meth:`KVCacheManager.swap_out` moves
a preempted request's blocks to host slots and :meth:`KVCacheManager.swap_in` back to fresh
device blocks, returning the ``(source, destination)`` block-id pairs the model runner copies
(all swap-outs of a step before its swap-ins, both before the forward pass). Only blocks the
request and other swapped-out requests reference move; a block shared with a request that
still runs (prefix cache hit, ref count > 1) keeps the swapped-out request's reference and stays
on device. When the last running holder of such a kept block is swapped out too, the block is
copied to the host once and every swapped-out holder refers to that one host slot (host ref
counts), so a block is never duplicated on the host. A swapped-in block whose hash is still in
the device prefix cache is re-used from there instead of copied.

Disk tier (``num_disk_blocks`` > 0, cold KV on disk): :meth:`KVCacheManager.spill` moves a
swapped-out request's host blocks that no other swapped-out request shares (host ref count 1) to
disk slots and frees their host slots (``(host, disk)`` pairs to write, before anything reuses
those host slots: before the step's swap-outs); :meth:`KVCacheManager.promote` brings them back to
fresh host slots (``(disk, host)`` pairs to read, after the step's swap-ins, which may read host
slots it reuses). A request with blocks on disk is promoted before :meth:`KVCacheManager.swap_in`
(which refuses it). Within one step every spill is planned before any promotion (a disk slot a
promotion frees is not rewritten before it is read; :meth:`KVCacheManager.spill` raises
otherwise until :meth:`KVCacheManager.begin_step`).

Fork and copy-on-write (parallel sampling, :mod:`engine.parallel_sampling`): :meth:`KVCacheManager.fork`
gives a new request the same block table as an existing one, taking one more reference on each
block. Before a request writes a token into a block another holder references (ref count > 1:
a sibling choice, or a swapped-out sibling keeping it on device), :meth:`KVCacheManager.allocate_slots`
gives it a fresh block and records a ``(source, destination)`` copy; the caller copies those
(:meth:`KVCacheManager.take_copies`) after the step's swap-outs and before its swap-ins and
forward pass. Only a partial block can be written, so only partial blocks are ever copied.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.block_hash import BlockHash, chain_hashes
from engine.host_pool import HostBlockPool
from engine.request import Request

NULL_BLOCK = -1  # block_table() entry of a block dropped out of the sliding window (never read)


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass(frozen=True)
class HostBlock:
    """A swapped-out request's block held in host slot ``host_id`` (``block_hash``: its prefix
    cache key, if it had one, re-registered on swap-in)."""

    host_id: int
    block_hash: BlockHash | None = None


@dataclass(frozen=True)
class DiskBlock:
    """A swapped-out request's block spilled to disk slot ``disk_id`` (the disk tier)."""

    disk_id: int
    block_hash: BlockHash | None = None


# device block kept (shared), host copy, disk copy, window hole
SwappedEntry = Block | HostBlock | DiskBlock | None


@dataclass
class SwapStats:
    blocks_out: int = 0  # device blocks copied to the host
    blocks_in: int = 0  # host blocks copied back to the device
    blocks_in_reused: int = 0  # host blocks not copied back: found in the device prefix cache
    blocks_kept: int = 0  # shared blocks left on device at swap-out
    host_refs_shared: int = 0  # kept references moved onto an already copied host slot
    blocks_spilled: int = 0  # host blocks written to the disk tier
    blocks_promoted: int = 0  # disk blocks read back to the host


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
        num_host_blocks: int = 0,
        num_disk_blocks: int = 0,
    ) -> None:
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        if num_disk_blocks < 0:
            raise ValueError(f"num_disk_blocks must be >= 0, got {num_disk_blocks}")
        if num_disk_blocks and not num_host_blocks:
            raise ValueError("a disk tier (num_disk_blocks > 0) needs a host pool (num_host_blocks > 0)")
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
        self.host: HostBlockPool | None = HostBlockPool(num_host_blocks) if num_host_blocks else None
        # disk tier slots (same accounting as host slots; never shared: only ref-1 host blocks spill)
        self.disk: HostBlockPool | None = HostBlockPool(num_disk_blocks) if num_disk_blocks else None
        self._promoted_this_step = False
        self._swapped: dict[str, list[SwappedEntry]] = {}
        self._kept: dict[int, set[str]] = {}  # device block -> swapped-out requests keeping it
        self.swap_stats = SwapStats()
        self._copies: list[tuple[int, int]] = []  # copy-on-write (source, destination) pending
        self.num_cow_copies = 0  # cumulative

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
            cow = self._shared_write_block(req, table)
            if max(need, 0) + (cow is not None) > self.pool.num_free_blocks:
                return False
            if cow is not None:
                self._copy_on_write(table, cow)
            if need > 0:
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

    # ---------------------------------------------------------------- fork / copy-on-write
    def _shared_write_block(self, req: Request, table: list[Block | None]) -> int | None:
        """Index of the partial block ``req`` writes next when another holder references it."""
        if req.num_computed_tokens % self.block_size == 0:
            return None  # the next token starts a new block
        i = req.num_computed_tokens // self.block_size
        if i >= len(table):
            return None
        b = table[i]
        return i if b is not None and b.ref_cnt > 1 else None

    def _copy_on_write(self, table: list[Block | None], i: int) -> None:
        src = table[i]
        assert src is not None
        (dst,) = self.pool.allocate(1)
        self._copies.append((src.block_id, dst.block_id))
        self.pool.release([src])
        table[i] = dst
        self.num_cow_copies += 1

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write ``(source, destination)`` block pairs recorded since the last call;
        the caller must copy them after the step's swap-outs, before its swap-ins and forward."""
        out, self._copies = self._copies, []
        return out

    def fork(self, parent_id: str, child: Request) -> None:
        """Give ``child`` the parent's block table, sharing every block (one more reference
        each); the child's first write into the shared partial block copies it (see the module
        doc). ``child.num_computed_tokens`` must not exceed the parent's computed tokens. Raises
        RuntimeError when the parent holds no blocks or the child already does."""
        table = self._tables.get(parent_id)
        if table is None:
            raise RuntimeError(f"request {parent_id} holds no device blocks to fork")
        if child.request_id in self._tables or child.request_id in self._swapped:
            raise RuntimeError(f"request {child.request_id} already holds blocks")
        live = [b for b in table if b is not None]
        self.pool.touch(live)
        self._tables[child.request_id] = list(table)
        self._num_registered[child.request_id] = self._num_registered.get(parent_id, 0)
        self._num_skipped[child.request_id] = self._num_skipped.get(parent_id, 0)

    def ref_count(self, block_id: int) -> int:
        """References on a device block (requests holding it, swapped-out keepers included)."""
        return self.pool.blocks[block_id].ref_cnt

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

    def trim(self, request_id: str, num_tokens: int) -> int:
        """Release the request's trailing blocks past the first ``blocks_needed(num_tokens)``
        (speculative decoding's roll-back: blocks allocated only for rejected drafts); returns
        how many. Raises RuntimeError if a block registered in the prefix cache would go."""
        table = self._tables.get(request_id)
        keep = self.blocks_needed(num_tokens)
        if not table or len(table) <= keep:
            return 0
        if self._num_registered.get(request_id, 0) > keep:
            raise RuntimeError(f"request {request_id}: trimming to {num_tokens} tokens drops a cached block")
        tail = table[keep:]
        del table[keep:]
        self.pool.release(b for b in reversed(tail) if b is not None)
        return len(tail)

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first), on device and, if it is swapped out,
        on the host. Unknown ids are a no-op."""
        table = self._tables.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._num_skipped.pop(request_id, None)
        if table:
            self.pool.release(b for b in reversed(table) if b is not None)
        swapped = self._swapped.pop(request_id, None)
        if swapped:
            kept = [b for b in reversed(swapped) if isinstance(b, Block)]
            for b in kept:
                self._unkeep(b, request_id)
            self.pool.release(kept)
            if self.host is not None:
                self.host.free(e.host_id for e in swapped if isinstance(e, HostBlock))
            if self.disk is not None:
                self.disk.free(e.disk_id for e in swapped if isinstance(e, DiskBlock))

    def _unkeep(self, b: Block, request_id: str) -> None:
        holders = self._kept.get(b.block_id)
        if holders is not None:
            holders.discard(request_id)
            if not holders:
                del self._kept[b.block_id]

    # ---------------------------------------------------------------- swap
    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host is not None else 0

    @property
    def num_free_host_blocks(self) -> int:
        return self.host.num_free_blocks if self.host is not None else 0

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._swapped

    def _moves(self, b: Block) -> bool:
        """Whether a swap-out moves ``b`` to the host: no running request but this one holds it
        (its other references, if any, are swapped-out requests keeping it on device)."""
        return b.ref_cnt == 1 + len(self._kept.get(b.block_id, ()))

    def num_swap_out_blocks(self, request_id: str) -> int:
        """Blocks a swap-out of the request would copy to the host (host slots it would take)."""
        return sum(1 for b in self._tables.get(request_id, ()) if b is not None and self._moves(b))

    def num_swap_in_blocks(self, request_id: str) -> int:
        """Host (and disk) blocks of a swapped-out request (at most this many are copied back)."""
        return sum(1 for e in self._swapped.get(request_id, ()) if isinstance(e, (HostBlock, DiskBlock)))

    # ---------------------------------------------------------------- disk tier
    @property
    def num_disk_blocks(self) -> int:
        return self.disk.num_blocks if self.disk is not None else 0

    @property
    def num_free_disk_blocks(self) -> int:
        return self.disk.num_free_blocks if self.disk is not None else 0

    def begin_step(self) -> None:
        """A new scheduling step starts: spills may be planned again (see :meth:`spill`)."""
        self._promoted_this_step = False

    def num_spill_blocks(self, request_id: str) -> int:
        """Host blocks of a swapped-out request that :meth:`spill` would move to disk (those no
        other swapped-out request shares)."""
        if self.host is None:
            return 0
        host = self.host
        return sum(
            1
            for e in self._swapped.get(request_id, ())
            if isinstance(e, HostBlock) and host.ref_cnt(e.host_id) == 1
        )

    def num_disk_blocks_of(self, request_id: str) -> int:
        """Blocks of a swapped-out request that are on disk (promoted before its swap-in)."""
        return sum(1 for e in self._swapped.get(request_id, ()) if isinstance(e, DiskBlock))

    def disk_ids_of(self, request_id: str) -> list[int]:
        """Disk slots a swapped-out request holds (empty when none or not swapped out)."""
        return [e.disk_id for e in self._swapped.get(request_id, ()) if isinstance(e, DiskBlock)]

    def host_ids_of(self, request_id: str) -> list[int]:
        """Host slots a swapped-out request references (empty when none or not swapped out)."""
        return [e.host_id for e in self._swapped.get(request_id, ()) if isinstance(e, HostBlock)]

    def spill(self, request_id: str) -> list[tuple[int, int]]:
        """Move a swapped-out request's unshared host blocks to disk slots and free their host
        slots; returns ``(host_block, disk_block)`` pairs the caller writes before anything
        reuses those host slots. Raises RuntimeError when there is no disk tier, the request is
        not swapped out, the disk is short, or a promotion was planned in this step (nothing
        changed then)."""
        if self.disk is None or self.host is None:
            raise RuntimeError("spill without a disk tier (num_disk_blocks=0)")
        if self._promoted_this_step:
            raise RuntimeError("spill planned after a promotion in the same step (begin_step first)")
        entries = self._swapped.get(request_id)
        if entries is None:
            raise RuntimeError(f"request {request_id} is not swapped out")
        idx = [
            i for i, e in enumerate(entries) if isinstance(e, HostBlock) and self.host.ref_cnt(e.host_id) == 1
        ]
        disk_ids = self.disk.allocate(len(idx))  # raises when short, before anything changes
        pairs: list[tuple[int, int]] = []
        for i, d in zip(idx, disk_ids, strict=True):
            e = entries[i]
            assert isinstance(e, HostBlock)
            entries[i] = DiskBlock(d, e.block_hash)
            pairs.append((e.host_id, d))
        self.host.free(h for h, _ in pairs)
        self.swap_stats.blocks_spilled += len(pairs)
        return pairs

    def promote(self, request_id: str) -> list[tuple[int, int]]:
        """Bring a swapped-out request's disk blocks back to fresh host slots and free their
        disk slots; returns ``(disk_block, host_block)`` pairs the caller reads after the step's
        swap-ins. Raises RuntimeError when the request is not swapped out or the host pool is
        short (nothing changed then)."""
        if self.disk is None or self.host is None:
            raise RuntimeError("promote without a disk tier (num_disk_blocks=0)")
        entries = self._swapped.get(request_id)
        if entries is None:
            raise RuntimeError(f"request {request_id} is not swapped out")
        idx = [i for i, e in enumerate(entries) if isinstance(e, DiskBlock)]
        host_ids = self.host.allocate(len(idx))  # raises when short, before anything changes
        pairs: list[tuple[int, int]] = []
        for i, h in zip(idx, host_ids, strict=True):
            e = entries[i]
            assert isinstance(e, DiskBlock)
            entries[i] = HostBlock(h, e.block_hash)
            pairs.append((e.disk_id, h))
        self.disk.free(d for d, _ in pairs)
        self.swap_stats.blocks_promoted += len(pairs)
        if pairs:
            self._promoted_this_step = True
        return pairs

    def swap_out(self, req: Request) -> list[tuple[int, int]]:
        """Move the request's blocks no running request shares to host slots (one slot per
        block, shared with the swapped-out requests that kept it) and release them on device.

        Returns ``(device_block, host_block)`` pairs to copy; the caller must copy them before
        anything writes the released device blocks (i.e. before the step's forward pass and its
        swap-ins). Blocks a running request shares keep this request's reference (they stay on
        device). Raises
        RuntimeError when there is no host pool, the request holds no blocks, or the host pool
        is short (nothing changed then).
        """
        if self.host is None:
            raise RuntimeError("swap_out without a host block pool (num_host_blocks=0)")
        rid = req.request_id
        table = self._tables.get(rid)
        if table is None:
            raise RuntimeError(f"request {rid} holds no device blocks to swap out")
        n = self.num_swap_out_blocks(rid)
        host_ids = self.host.allocate(n)  # raises when short, before anything changes
        entries: list[SwappedEntry] = []
        pairs: list[tuple[int, int]] = []
        released: list[Block] = []  # one item per device reference dropped
        it = iter(host_ids)
        for b in table:
            if b is None:
                entries.append(None)
                continue
            if not self._moves(b):
                entries.append(b)  # a running request shares it: stays on device
                self._kept.setdefault(b.block_id, set()).add(rid)
                self.swap_stats.blocks_kept += 1
                continue
            hb = HostBlock(next(it), b.block_hash)
            entries.append(hb)
            pairs.append((b.block_id, hb.host_id))
            released.append(b)
            # swapped-out requests that kept this block now share the one host copy
            for other in self._kept.pop(b.block_id, ()):
                oe = self._swapped[other]
                oe[next(i for i, e in enumerate(oe) if e is b)] = hb
                self.host.incref(hb.host_id)
                self.swap_stats.host_refs_shared += 1
                released.append(b)
        del self._tables[rid]
        self._swapped[rid] = entries
        self.pool.release(reversed(released))
        self.swap_stats.blocks_out += len(pairs)
        return pairs

    def swap_in_blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Free device blocks a swap-in plus ``num_new_tokens`` more tokens would take."""
        entries = self._swapped.get(req.request_id)
        if entries is None:
            raise RuntimeError(f"request {req.request_id} is not swapped out")
        need = 0
        for e in entries:
            if isinstance(e, (HostBlock, DiskBlock)):
                hit = self._reusable(e)
                need += 1 if hit is None or hit.ref_cnt == 0 else 0
        grow = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(entries)
        if num_new_tokens > 0 and req.num_computed_tokens % self.block_size:
            i = req.num_computed_tokens // self.block_size
            e = entries[i] if i < len(entries) else None
            if isinstance(e, Block) and e.ref_cnt > 1:
                need += 1  # its next write copies a block it shares (copy-on-write)
        return need + max(0, grow)

    def _reusable(self, e: HostBlock | DiskBlock) -> Block | None:
        if e.block_hash is None or not self.enable_prefix_caching:
            return None
        return self.pool.lookup(e.block_hash)

    def swap_in(self, req: Request) -> list[tuple[int, int]]:
        """Bring a swapped-out request's blocks back to the device; returns ``(host_block,
        device_block)`` pairs to copy (before the step's forward pass, after its swap-outs).

        A host block whose hash is still in the device prefix cache takes a reference on that
        device block instead (no copy). Raises RuntimeError when the request is not swapped out
        or the device pool is short (check :meth:`swap_in_blocks_needed` first; nothing changed).
        """
        rid = req.request_id
        entries = self._swapped.get(rid)
        if entries is None or self.host is None:
            raise RuntimeError(f"request {rid} is not swapped out")
        if any(isinstance(e, DiskBlock) for e in entries):
            raise RuntimeError(f"request {rid} has blocks on disk: promote it before its swap-in")
        need = self.swap_in_blocks_needed(req, 0)
        if need > self.pool.num_free_blocks:
            raise RuntimeError(f"swap-in of {rid} needs {need} blocks, {self.pool.num_free_blocks} free")
        # take every prefix-cache hit first, so that allocating the copies cannot evict one
        hits = [self._reusable(e) if isinstance(e, HostBlock) else None for e in entries]
        self.pool.touch(h for h in hits if h is not None)
        table: list[Block | None] = []
        pairs: list[tuple[int, int]] = []
        freed: list[int] = []
        for e, hit in zip(entries, hits, strict=True):
            if not isinstance(e, HostBlock):
                if e is not None:
                    self._unkeep(e, rid)
                table.append(e)
                continue
            freed.append(e.host_id)
            if hit is not None:
                table.append(hit)
                self.swap_stats.blocks_in_reused += 1
                continue
            (blk,) = self.pool.allocate(1)
            table.append(blk)
            pairs.append((e.host_id, blk.block_id))
            if e.block_hash is not None and self.enable_prefix_caching:
                self.pool.register(blk, e.block_hash)
        del self._swapped[rid]
        self._tables[rid] = table
        self.host.free(freed)
        self.swap_stats.blocks_in += len(pairs)
        return pairs

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

    def extend_blocks(self, request_id: str, n: int) -> list[int]:
        """Append ``n`` fresh blocks to the request's table (creating it) for KV copied in from
        elsewhere (live migration's destination, which allocates stage by stage before the
        request is scheduled); returns their ids in order. Raises RuntimeError when fewer than
        ``n`` blocks are free or a sliding window is set (nothing changed then).
        :meth:`free` releases them."""
        if self.sliding_window is not None:
            raise RuntimeError("extend_blocks does not support a sliding window")
        if n > self.pool.num_free_blocks:
            raise RuntimeError(f"need {n} blocks, {self.pool.num_free_blocks} free")
        blocks = self.pool.allocate(n)
        self._tables.setdefault(request_id, []).extend(blocks)
        self._num_registered.setdefault(request_id, 0)
        self._num_skipped.setdefault(request_id, 0)
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
