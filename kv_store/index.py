"""Cluster KV index: which store nodes hold which blocks (pure; storage-agnostic protocol).

Store nodes :meth:`~KVIndex.register` blocks when stored and :meth:`~KVIndex.unregister` them when
evicted or deleted; the router asks :meth:`~KVIndex.lookup` for the longest cached prefix of a
request's block chain. :class:`InMemoryIndex` is the embedded implementation;
:class:`kv_store.redis_index.RedisIndex` implements the same protocol on Redis (shared by routers
and store nodes of a cluster). :func:`best_node_for_prefix` picks the node to route to;
:func:`locate_prefix` is the router's one-call global Lookup from prompt token ids.

Lookup contract: ``num_prefix_blocks`` is the largest ``n`` such that each of ``hashes[:n]`` is
registered on at least one node (the chain is a prefix: a block after a miss is not counted even
if present, because its KV depends on the missing one's). ``locations[i]`` lists every node
holding ``hashes[i]``, ordered by ``node_id``; ``tiers[i]`` (parallel to ``locations[i]``) says
in which of that node's tiers the block is (:class:`Tier`: DRAM arena or disk segments; a block
in both is DRAM). An index that does not record tiers returns ``tiers`` empty (read: DRAM).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.block_hash import BlockHash, chain_hashes
from kv_store.handle import BlockLocation
from pdserve.errors import InvalidRequestError


class Tier(enum.Enum):
    """Where a store node holds a block: its DRAM arena, or only its disk tier (a read of it
    first promotes it to DRAM, at the disk's read bandwidth: ``KVStoreStats.disk_read_bytes_per_s``)."""

    DRAM = "dram"
    DISK = "disk"


@dataclass(frozen=True)
class LookupResult:
    num_prefix_blocks: int
    locations: tuple[tuple[BlockLocation, ...], ...]  # one entry per prefix block
    # parallel to ``locations`` (per block, per holder); empty: not recorded (all DRAM)
    tiers: tuple[tuple[Tier, ...], ...] = ()

    def tier_of(self, i: int, node_id: str) -> Tier:
        """Tier of prefix block ``i`` on ``node_id`` (DRAM when tiers are not recorded).
        KeyError if that node does not hold the block."""
        for j, loc in enumerate(self.locations[i]):
            if loc.node_id == node_id:
                return self.tiers[i][j] if self.tiers else Tier.DRAM
        raise KeyError(f"node {node_id!r} does not hold prefix block {i}")

    def disk_blocks_by_node(self) -> dict[str, int]:
        """Per node, how many of the prefix blocks it holds only on disk (nodes with none absent)."""
        out: dict[str, int] = {}
        for locs, tiers in zip(self.locations, self.tiers, strict=False):
            for loc, t in zip(locs, tiers, strict=True):
                if t is Tier.DISK:
                    out[loc.node_id] = out.get(loc.node_id, 0) + 1
        return out

    def nodes_with_whole_prefix(self) -> list[str]:
        """Node ids holding every prefix block (candidates for a single-source pull)."""
        if not self.locations:
            return []
        common = {loc.node_id for loc in self.locations[0]}
        for locs in self.locations[1:]:
            common &= {loc.node_id for loc in locs}
        return sorted(common)

    def prefix_blocks_by_node(self) -> dict[str, int]:
        """Per node, how many leading blocks of the prefix it holds contiguously from block 0
        (what a single-source pull from that node would cover). Nodes holding none are absent."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, locs in enumerate(self.locations):
            here = {loc.node_id for loc in locs}
            alive = here if alive is None else alive & here
            if not alive:
                break
            for n in alive:
                out[n] = i + 1
        return out

    def disk_blocks_in_prefix(self, node_id: str, num_blocks: int) -> int:
        """Of the first ``num_blocks`` prefix blocks, how many ``node_id`` holds only on disk."""
        if not self.tiers:
            return 0
        n = 0
        for i in range(min(num_blocks, len(self.locations))):
            try:
                n += self.tier_of(i, node_id) is Tier.DISK
            except KeyError:
                break
        return n

    def best_node(self, load: Callable[[str], float] | None = None) -> tuple[BlockLocation, int] | None:
        """See :func:`best_node_for_prefix`."""
        return best_node_for_prefix(self, load)


def best_node_for_prefix(
    result: LookupResult, load: Callable[[str], float] | None = None
) -> tuple[BlockLocation, int] | None:
    """Global lookup: the node holding the longest cached prefix, and that prefix's length.

    Pure. Ranks nodes by the number of leading blocks they hold contiguously (most first), then
    by ``load(node_id)`` (least first; e.g. queue length or used fraction; default 0), then by
    ``node_id``. Returns ``(location, n_blocks)``, or None when no block of the chain is cached.
    """
    counts = result.prefix_blocks_by_node()
    if not counts:
        return None
    score = load if load is not None else (lambda _n: 0.0)
    best = min(counts, key=lambda n: (-counts[n], score(n), n))
    loc = next(loc for loc in result.locations[0] if loc.node_id == best)
    return loc, counts[best]


def prompt_prefix_hashes(
    prompt_token_ids: Sequence[int], block_size: int, model_id: str, adapter_id: str = "", salt: str = ""
) -> list[BlockHash]:
    """Keys of the prompt's blocks a prefix cache can serve: every full block except one holding
    the last prompt token (that token is always computed). Same as the engine's
    ``LLMEngine.prefix_hashes``, so a router finds exactly what the prefill worker would pull."""
    n = max(0, (len(prompt_token_ids) - 1) // block_size)
    return chain_hashes(list(prompt_token_ids[: n * block_size]), block_size, model_id, adapter_id, salt)


def locate_prefix_tiers(
    index: KVIndex,
    prompt_token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    adapter_id: str = "",
    salt: str = "",
) -> tuple[BlockLocation, int, int] | None:
    """:func:`locate_prefix`, and how many of that prefix's blocks the node holds only in its disk
    tier (a pull reads them from disk first): ``(location, blocks, disk blocks)`` or None."""
    hashes = prompt_prefix_hashes(prompt_token_ids, block_size, model_id, adapter_id, salt)
    if not hashes:
        return None
    result = index.lookup(hashes)
    best = best_node_for_prefix(result)
    if best is None:
        return None
    loc, n = best
    return loc, n, result.disk_blocks_in_prefix(loc.node_id, n)


def locate_prefix(
    index: KVIndex,
    prompt_token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    adapter_id: str = "",
    salt: str = "",
    load: Callable[[str], float] | None = None,
) -> tuple[BlockLocation, int] | None:
    """Global Lookup for a router: the store node holding the longest cached prefix of the prompt
    and that prefix's length in blocks (see :func:`best_node_for_prefix`), or None when nothing
    is cached. With a Redis index every router sharing the URL gets the same answer."""
    hashes = prompt_prefix_hashes(prompt_token_ids, block_size, model_id, adapter_id, salt)
    if not hashes:
        return None
    return best_node_for_prefix(index.lookup(hashes), load)


class KVIndex(Protocol):
    def add_node(self, location: BlockLocation) -> None:
        """Announce a node (or update its address); required before :meth:`register`."""
        ...

    def register(self, node_id: str, hashes: Iterable[BlockHash], tier: Tier = Tier.DRAM) -> None:
        """Record that ``node_id`` stores ``hashes`` in ``tier`` (idempotent; a later register
        of the same block moves it to the new tier)."""
        ...

    def unregister(self, node_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that ``node_id`` no longer stores ``hashes`` (unknown pairs are ignored)."""
        ...

    def drop_node(self, node_id: str) -> None:
        """Forget a node and all its blocks (node left or failed). Unknown ids are ignored."""
        ...

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        """Longest registered prefix of the chain ``hashes`` and where its blocks are."""
        ...


class InMemoryIndex:
    """:class:`KVIndex` in process memory. Not thread-safe; callers serialise (BlockStore does)."""

    def __init__(self) -> None:
        self._nodes: dict[str, BlockLocation] = {}
        self._where: dict[BlockHash, set[str]] = {}
        self._blocks: dict[str, set[BlockHash]] = {}
        self._disk: dict[str, set[BlockHash]] = {}  # per node: blocks held only on its disk tier

    def add_node(self, location: BlockLocation) -> None:
        if not location.node_id:
            raise InvalidRequestError("index: a node needs a non-empty node_id")
        self._nodes[location.node_id] = location
        self._blocks.setdefault(location.node_id, set())

    def nodes(self) -> list[BlockLocation]:
        return [self._nodes[k] for k in sorted(self._nodes)]

    def register(self, node_id: str, hashes: Iterable[BlockHash], tier: Tier = Tier.DRAM) -> None:
        blocks = self._blocks.get(node_id)
        if blocks is None:
            raise InvalidRequestError(f"index: node {node_id!r} is not known; call add_node first")
        tier = Tier(tier)
        disk = self._disk.setdefault(node_id, set())
        for h in hashes:
            self._where.setdefault(h, set()).add(node_id)
            blocks.add(h)
            if tier is Tier.DISK:
                disk.add(h)
            else:
                disk.discard(h)

    def unregister(self, node_id: str, hashes: Iterable[BlockHash]) -> None:
        blocks = self._blocks.get(node_id)
        if blocks is None:
            return
        disk = self._disk.get(node_id, set())
        for h in hashes:
            blocks.discard(h)
            disk.discard(h)
            holders = self._where.get(h)
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self._where[h]

    def drop_node(self, node_id: str) -> None:
        blocks = self._blocks.get(node_id)
        if blocks:
            self.unregister(node_id, list(blocks))
        self._blocks.pop(node_id, None)
        self._disk.pop(node_id, None)
        self._nodes.pop(node_id, None)

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        locs: list[tuple[BlockLocation, ...]] = []
        tiers: list[tuple[Tier, ...]] = []
        any_disk = False
        for h in hashes:
            holders = self._where.get(h)
            if not holders:
                break
            ns = sorted(holders)
            locs.append(tuple(self._nodes[n] for n in ns))
            t = tuple(Tier.DISK if h in self._disk.get(n, ()) else Tier.DRAM for n in ns)
            any_disk |= Tier.DISK in t
            tiers.append(t)
        return LookupResult(len(locs), tuple(locs), tuple(tiers) if any_disk else ())

    def sync_node(
        self, location: BlockLocation, hashes: Sequence[BlockHash], disk_hashes: Sequence[BlockHash] = ()
    ) -> int:
        """Make the index hold exactly ``hashes`` (DRAM) and ``disk_hashes`` (disk tier) for
        this node, announcing it too. Returns how many stale entries were removed."""
        self.add_node(location)
        nid = location.node_id
        want = set(hashes) | set(disk_hashes)
        stale = [h for h in self._blocks[nid] if h not in want]
        self.unregister(nid, stale)
        self.register(nid, hashes)
        self.register(nid, [h for h in disk_hashes if h not in set(hashes)], Tier.DISK)
        return len(stale)

    def num_blocks(self, node_id: str | None = None) -> int:
        """Distinct blocks registered (on ``node_id``, or anywhere)."""
        if node_id is None:
            return len(self._where)
        return len(self._blocks.get(node_id, ()))
