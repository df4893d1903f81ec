"""The store node's disk tier (kv_store/disk_tier.py, kv_store/segment.py, BlockStore with
``StoreConfig.disk_tier``): eviction to disk and reads after it, promotion under a lease, restart
survival, the index's tier, and each bad-disk case (full disk through a fake file layer, corrupt
bytes, truncated and deleted segment files). Small blocks (256 bytes) and tiny budgets keep every
test well under a second."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engine.block_hash import chain_hashes
from kv_store.__main__ import disk_tier_config, parse_config
from kv_store.convert import lookup_from_proto, lookup_to_proto, stats_from_proto, stats_to_proto
from kv_store.disk_metrics import register_disk_metrics
from kv_store.disk_tier import DiskTier, DiskTierConfig, DiskTierSizeError, DiskTierStats
from kv_store.index import InMemoryIndex, LookupResult, Tier
from kv_store.layout import KVLayout
from kv_store.segment import (
    RECORD_HEADER_NBYTES,
    ForeignSegmentError,
    OsFileLayer,
    read_segment_header,
    scan_records,
    segment_seq,
)
from kv_store.store import BlockStore, StoreConfig, disk_fingerprint
from pdserve.errors import RequestNotFoundError

L = KVLayout("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_size=4)
NB = L.block_nbytes  # 256
REC = RECORD_HEADER_NBYTES + NB


def blocks(n: int, salt: str = "") -> tuple[list[bytes], list[bytes]]:
    hs = chain_hashes(list(range(n * 4)), 4, "m", salt=salt)
    return hs, [os.urandom(NB) for _ in hs]


def disk_cfg(path: Path, capacity: int = 64 << 10, segment: int = 8 * REC, **kw) -> DiskTierConfig:
    return DiskTierConfig(str(path), capacity, segment_bytes=segment, **kw)


def make_store(
    path: Path, capacity_blocks: int = 4, index: InMemoryIndex | None = None, files=None, **kw
) -> BlockStore:
    cfg = StoreConfig("n0", L, capacity_blocks, use_shm=False, disk_tier=disk_cfg(path, **kw))
    return BlockStore(cfg, index if index is not None else InMemoryIndex(), disk_files=files)


def tiers_of(index: InMemoryIndex, hs: Sequence[bytes]) -> list[Tier | None]:
    """Per block: its tier on n0, or None if not registered."""
    out: list[Tier | None] = []
    for h in hs:
        r = index.lookup([h])
        out.append(r.tier_of(0, "n0") if r.num_prefix_blocks else None)
    return out


def segments(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if segment_seq(p.name) is not None)


def wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- eviction and hits
def test_evicted_blocks_go_to_disk_and_read_back_identical(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store = make_store(tmp_path, index=index)
    try:
        hs, data = blocks(10)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        # the 6 oldest were evicted from the 4-slot arena: on disk, registered as DISK
        assert tiers_of(index, hs) == [Tier.DISK] * 6 + [Tier.DRAM] * 4
        s = store.stats()
        assert s.disk is not None and s.disk.demotions == 6 and s.disk.num_blocks == 6
        assert store.exists(hs) == [True] * 10
        # hit after eviction: bytes identical, promoted to DRAM, index says DRAM again
        assert store.get_block(hs[0]) == data[0]
        assert tiers_of(index, hs[:1]) == [Tier.DRAM]
        assert store.stats().promotions == 1
        assert store.stats().node.puts == 10  # a promotion is not a put
        # every block, in any order, reads back identical (each read promotes, evicting others)
        for i in [9, 3, 1, 8, 2, 5, 0, 7, 4, 6]:
            assert store.get_block(hs[i]) == data[i]
        assert store.disk.flush()
        st = store.stats()
        assert st.disk is not None and st.disk.read_bytes_per_s > 0 and st.disk.checksum_failures == 0
        # a block already on disk is not written again when evicted again
        assert st.disk.demotions == 10
    finally:
        store.close()


def test_one_segment_holds_many_blocks_without_a_file_per_block(tmp_path: Path) -> None:
    store = make_store(tmp_path, capacity_blocks=2, segment=64 * REC)
    try:
        hs, data = blocks(40)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
    finally:
        store.close()
    (seg,) = segments(tmp_path)  # 38 blocks, one file
    files = OsFileLayer()
    _, hlen = read_segment_header(files, str(seg))
    recs = list(scan_records(files, str(seg), hlen))
    assert [r.block_hash for r in recs] == hs[:38]
    assert all(r.nbytes == NB for r in recs)


def test_lease_promotes_and_the_block_stays_pinned_while_leased(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        hs, data = blocks(8)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        assert store.node.slot_of(hs[0]) is None  # only on disk
        # one lease over a disk block and DRAM blocks: the promotion must not evict the others
        grant = store.lease([hs[0], hs[7]], ttl_s=30)
        assert len(grant.slots) == 2
        assert bytes(store.arena.view(grant.slots[0])) == data[0]
        more, more_data = blocks(12, salt="more")
        for h, d in zip(more, more_data, strict=True):
            store.put_block(h, d)  # churns the unpinned slot; the leased ones stay
        assert [store.node.slot_of(h) for h in (hs[0], hs[7])] == list(grant.slots)
        assert bytes(store.arena.view(grant.slots[0])) == data[0]
        assert bytes(store.arena.view(grant.slots[1])) == data[7]
        assert store.release(grant.lease_id)
        store.put_block(*blocks(1, salt="x")[0], *blocks(1, salt="x")[1])
        store.put_block(*blocks(1, salt="y")[0], *blocks(1, salt="y")[1])
        store.put_block(*blocks(1, salt="z")[0], *blocks(1, salt="z")[1])
        assert store.node.slot_of(hs[0]) is None  # evictable again once released
        assert store.get_block(hs[0]) == data[0]
    finally:
        store.close()


def test_lookup_hit_on_disk_promotes_in_the_background(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store = make_store(tmp_path, index=index)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        r = store.lookup(hs[:2])
        assert r.num_prefix_blocks == 2 and r.tiers == ((Tier.DISK,), (Tier.DISK,))
        assert r.disk_blocks_by_node() == {"n0": 2}
        wait_for(lambda: store.node.slot_of(hs[0]) is not None and store.node.slot_of(hs[1]) is not None)
        assert tiers_of(index, hs[:2]) == [Tier.DRAM, Tier.DRAM]
        assert store.get_block(hs[1]) == data[1]
    finally:
        store.close()


def test_put_of_a_disk_key_with_other_bytes_is_a_conflict_and_keeps_the_stored_bytes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        assert store.put_block(hs[0], os.urandom(NB)) is False  # write-once
        assert store.get_block(hs[0]) == data[0]
        assert store.stats().node.put_conflicts == 1
    finally:
        store.close()


def test_delete_forgets_the_disk_copy(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store = make_store(tmp_path, index=index)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        res = store.delete([hs[0], hs[5]])  # one on disk only, one in DRAM (and not on disk)
        assert set(res.deleted) == {hs[0], hs[5]} and res.num_missing == 0
        assert store.exists([hs[0], hs[5]]) == [False, False]
        assert tiers_of(index, [hs[0], hs[5]]) == [None, None]
        with pytest.raises(RequestNotFoundError):
            store.get_block(hs[0])
    finally:
        store.close()


# ---------------------------------------------------------------------------- restart
def test_restarted_node_re_registers_its_disk_blocks(tmp_path: Path) -> None:
    hs, data = blocks(10)
    store = make_store(tmp_path)
    for h, d in zip(hs, data, strict=True):
        store.put_block(h, d)
    store.close()  # the writer drains what is staged
    index = InMemoryIndex()
    again = make_store(tmp_path, index=index)
    try:
        s = again.stats().disk
        assert s is not None and s.recovered_blocks == 6
        # on disk before the restart: registered as DISK, bytes identical (checksum verified on read)
        assert tiers_of(index, hs[:6]) == [Tier.DISK] * 6
        assert [again.get_block(h) for h in hs[:6]] == data[:6]
        # in DRAM at shutdown: not kept (the arena is memory)
        assert again.exists(hs[6:]) == [False] * 4
        # new blocks go to a new segment, the old ones stay readable
        more, more_data = blocks(6, salt="more")
        for h, d in zip(more, more_data, strict=True):
            again.put_block(h, d)
        assert again.disk is not None and again.disk.flush()
        assert len(segments(tmp_path)) >= 2
        assert again.get_block(more[0]) == more_data[0]
    finally:
        again.close()


def test_restart_ignores_a_truncated_tail_and_stops_at_a_damaged_header(tmp_path: Path) -> None:
    hs, data = blocks(10)
    store = make_store(tmp_path, capacity_blocks=1, segment=64 * REC)
    for h, d in zip(hs, data, strict=True):
        store.put_block(h, d)
    store.close()
    (seg,) = segments(tmp_path)  # 9 records
    size = seg.stat().st_size
    os.truncate(seg, size - NB // 2)  # the last record is incomplete (a crash mid-append)
    again = make_store(tmp_path, capacity_blocks=1, segment=64 * REC)
    try:
        assert again.stats().disk.recovered_blocks == 8  # type: ignore[union-attr]
        assert again.get_block(hs[7]) == data[7]
        assert again.exists([hs[8]]) == [False]
    finally:
        again.close()
    # damage the 4th record's header: records from there on cannot be located
    raw = bytearray(seg.read_bytes())
    _, hlen = read_segment_header(OsFileLayer(), str(seg))
    raw[hlen + 3 * REC + 10] ^= 0xFF
    seg.write_bytes(bytes(raw))
    third = make_store(tmp_path, capacity_blocks=1, segment=64 * REC)
    try:
        assert third.stats().disk.recovered_blocks >= 3  # type: ignore[union-attr]
        assert third.exists(hs[3:8]) == [False] * 5
        assert [third.get_block(h) for h in hs[:3]] == data[:3]
    finally:
        third.close()


def test_segments_of_another_layout_are_refused_at_start(tmp_path: Path) -> None:
    store = make_store(tmp_path, capacity_blocks=1)
    hs, data = blocks(3)
    for h, d in zip(hs, data, strict=True):
        store.put_block(h, d)
    store.close()
    other = KVLayout("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_size=8)
    assert other.block_nbytes == NB  # same size, other layout: must not be served
    cfg = StoreConfig("n0", other, 2, use_shm=False, disk_tier=disk_cfg(tmp_path))
    with pytest.raises(ForeignSegmentError, match="another layout"):
        BlockStore(cfg, InMemoryIndex())
    (tmp_path / "000000000099.kvseg").write_bytes(b"not a segment at all, but named like one")
    with pytest.raises(ForeignSegmentError, match="not a pdserve KV segment"):
        make_store(tmp_path)


# ---------------------------------------------------------------------------- budget
def test_full_budget_evicts_least_recently_used_segments(tmp_path: Path) -> None:
    index = InMemoryIndex()
    cap = 3 * 4 * REC + 600  # three 4-record segments (plus headers) at most
    store = make_store(tmp_path, capacity_blocks=1, index=index, capacity=cap, segment=4 * REC + 200)
    try:
        assert store.disk is not None
        hs, data = blocks(8)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
            assert store.disk.flush()  # one write at a time: the segments' use order is fixed
        # touch the first segment (blocks 0-3) by reading block 0: it becomes most recently used
        assert store.get_block(hs[0]) == data[0]
        assert store.disk.flush()
        more, _ = blocks(6, salt="more")
        for h in more:
            store.put_block(h, os.urandom(NB))
            assert store.disk.flush()
        s = store.stats().disk
        assert s is not None and s.segment_evictions == 1
        assert s.bytes_used <= cap
        assert sum(p.stat().st_size for p in segments(tmp_path)) <= cap
        # the second segment (blocks 4-6, least recently used) went; the touched first one stayed
        assert store.exists(hs[4:7]) == [False] * 3
        assert tiers_of(index, hs[4:7]) == [None] * 3
        assert store.exists(hs[1:4]) == [True] * 3
        assert store.get_block(hs[2]) == data[2]
    finally:
        store.close()


# ---------------------------------------------------------------------------- bad disk
class FullDisk(OsFileLayer):
    """The OS file layer whose appends fail with ENOSPC once ``budget`` bytes were written
    (``budget`` None: no limit). A write crossing the budget writes a partial record first,
    as a real full disk does."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.written = 0

    def write(self, fd: int, parts) -> None:
        if self.budget is None:
            super().write(fd, parts)
            return
        data = b"".join(bytes(p) for p in parts)
        room = self.budget - self.written
        if len(data) > room:
            if room > 0:
                os.write(fd, data[:room])
                self.written += room
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(fd, [data])
        self.written += len(data)


def test_full_disk_stops_demotion_and_the_node_keeps_serving_from_dram(tmp_path: Path) -> None:
    files = FullDisk(None)
    index = InMemoryIndex()
    store = make_store(tmp_path, index=index, files=files, full_retry_s=3600)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        files.budget = files.written + REC // 2  # the disk fills mid-record
        more, more_data = blocks(8, salt="more")
        for h, d in zip(more, more_data, strict=True):
            store.put_block(h, d)  # never fails: eviction to disk just stops
        assert store.disk.flush()
        s = store.stats().disk
        assert s is not None and s.disk_full and s.full_events == 1 and s.demotions_dropped >= 1
        # served from DRAM; the blocks written before the disk filled are still served from disk
        assert [store.get_block(h) for h in more[4:]] == more_data[4:]
        assert store.get_block(hs[0]) == data[0]
        # a block evicted while the disk is full is gone, and unregistered
        lost = [h for h in more[:4] if not store.exists([h])[0]]
        assert lost and tiers_of(index, lost) == [None] * len(lost)
        reg = CollectorRegistry()
        register_disk_metrics(reg, "n0", store.stats)
        assert reg.get_sample_value("pdserve_kv_disk_full", {"node_id": "n0"}) == 1.0
        assert (
            reg.get_sample_value("pdserve_kv_disk_errors_total", {"node_id": "n0", "reason": "full"}) == 1.0
        )
    finally:
        store.close()
    # the partial record at the tail is ignored on restart; what was written survives
    again = make_store(tmp_path)
    try:
        assert again.get_block(hs[0]) == data[0]
    finally:
        again.close()


def test_demotion_resumes_after_the_retry_interval(tmp_path: Path) -> None:
    files = FullDisk(0)  # full from the start: even the segment header fails
    store = make_store(tmp_path, files=files, full_retry_s=0.05)
    try:
        hs, data = blocks(5)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        assert store.stats().disk.disk_full  # type: ignore[union-attr]
        assert segments(tmp_path) == []  # a segment without its header is not left behind
        files.budget = None  # space freed
        time.sleep(0.06)
        more, _ = blocks(2, salt="more")
        for h in more:
            store.put_block(h, os.urandom(NB))
        assert store.disk.flush()
        s = store.stats().disk
        assert s is not None and not s.disk_full and s.demotions >= 1
        assert store.get_block(hs[1]) == data[1]
    finally:
        store.close()


def _one_segment_store(
    tmp_path: Path, index: InMemoryIndex
) -> tuple[BlockStore, list[bytes], list[bytes], Path]:
    store = make_store(tmp_path, capacity_blocks=1, index=index, segment=64 * REC)
    hs, data = blocks(6)
    for h, d in zip(hs, data, strict=True):
        store.put_block(h, d)
    assert store.disk is not None and store.disk.flush()
    (seg,) = segments(tmp_path)
    return store, hs, data, seg


def test_corrupt_block_on_disk_is_a_miss_never_served(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store, hs, data, seg = _one_segment_store(tmp_path, index)
    try:
        _, hlen = read_segment_header(OsFileLayer(), str(seg))
        with open(seg, "r+b") as f:  # flip one data byte of block 2
            f.seek(hlen + 2 * REC + RECORD_HEADER_NBYTES + 100)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))
        with pytest.raises(RequestNotFoundError):
            store.get_block(hs[2])
        with pytest.raises(RequestNotFoundError):
            store.lease([hs[2]])
        s = store.stats()
        assert s.disk is not None and s.disk.checksum_failures == 1 and s.promotion_misses == 1
        assert tiers_of(index, hs[2:3]) == [None] and store.exists(hs[2:3]) == [False]
        assert store.get_block(hs[3]) == data[3]  # its neighbours are fine
    finally:
        store.close()


def test_truncated_segment_is_a_miss_for_the_blocks_cut_off(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store, hs, data, seg = _one_segment_store(tmp_path, index)
    try:
        _, hlen = read_segment_header(OsFileLayer(), str(seg))
        os.truncate(seg, hlen + 3 * REC + 10)  # blocks 3 and 4 cut off
        assert [store.get_block(h) for h in hs[:3]] == data[:3]
        for h in hs[3:5]:
            with pytest.raises(RequestNotFoundError):
                store.get_block(h)
        assert tiers_of(index, hs[3:5]) == [None, None]
        assert store.stats().disk.checksum_failures == 0  # type: ignore[union-attr]
    finally:
        store.close()


def test_segment_deleted_underneath_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    index = InMemoryIndex()
    store, hs, data, seg = _one_segment_store(tmp_path, index)
    try:
        seg.unlink()
        with pytest.raises(RequestNotFoundError):
            store.get_block(hs[0])
        assert store.disk is not None and store.disk.flush()  # the writer may have seen it first
        s = store.stats().disk
        assert s is not None and s.missing_files == 1
        assert not any(store.disk.contains(h) for h in hs[:5])  # type: ignore[union-attr]
        assert tiers_of(index, hs[:5]) == [None] * 5  # every block of that segment unregistered
        assert store.get_block(hs[5]) == data[5]  # DRAM unaffected
        # demotion continues in a new segment
        more, more_data = blocks(3, salt="more")
        for h, d in zip(more, more_data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        assert store.get_block(more[0]) == more_data[0]
    finally:
        store.close()


def test_whole_directory_deleted_underneath(tmp_path: Path) -> None:
    d = tmp_path / "tier"
    index = InMemoryIndex()
    store = make_store(d, capacity_blocks=1, index=index, segment=64 * REC)
    try:
        hs, data = blocks(4)
        for h, dd in zip(hs, data, strict=True):
            store.put_block(h, dd)
        assert store.disk is not None and store.disk.flush()
        for p in segments(d):
            p.unlink()
        d.rmdir()
        with pytest.raises(RequestNotFoundError):
            store.get_block(hs[0])
        more, more_data = blocks(3, salt="more")
        for h, dd in zip(more, more_data, strict=True):
            store.put_block(h, dd)  # the writer's errors do not reach puts
        assert store.disk.flush()
        assert store.get_block(more[2]) == more_data[2]
    finally:
        store.close()


# ---------------------------------------------------------------------------- index, wire, flags
def test_index_records_tiers_and_resync_keeps_them() -> None:
    from kv_store.handle import BlockLocation

    idx = InMemoryIndex()
    a, b = BlockLocation("a", "x:1"), BlockLocation("b", "x:2")
    idx.add_node(a)
    idx.add_node(b)
    hs, _ = blocks(3)
    idx.register("a", hs)
    idx.register("b", hs[:2], Tier.DISK)
    r = idx.lookup(hs)
    assert r.num_prefix_blocks == 3
    assert r.tiers == ((Tier.DRAM, Tier.DISK), (Tier.DRAM, Tier.DISK), (Tier.DRAM,))
    assert r.tier_of(1, "b") is Tier.DISK and r.disk_blocks_by_node() == {"b": 2}
    idx.register("b", hs[:1])  # promoted: DRAM again
    assert idx.lookup(hs[:1]).tiers == ()
    assert idx.sync_node(b, [hs[0]], [hs[2]]) == 1  # hs[1] was stale
    assert idx.lookup(hs[2:]).tiers == ((Tier.DRAM, Tier.DISK),)
    back = lookup_from_proto(lookup_to_proto(idx.lookup(hs)))
    assert back == idx.lookup(hs)
    plain = LookupResult(1, ((a,),))
    assert lookup_from_proto(lookup_to_proto(plain)) == plain and plain.tier_of(0, "a") is Tier.DRAM


def test_stats_carry_the_disk_tier_and_its_read_bandwidth(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        store.get_block(hs[0])
        s = store.stats()
        back = stats_from_proto(stats_to_proto(s))
        assert back.disk is not None and s.disk is not None
        assert back.disk.read_bytes_per_s == s.disk.read_bytes_per_s > 0
        assert back.promotions == 1 and back.disk.demotions == s.disk.demotions
        reg = CollectorRegistry()
        register_disk_metrics(reg, "n0", store.stats)
        assert reg.get_sample_value("pdserve_kv_tier_hits_total", {"node_id": "n0", "source": "disk"}) == 1
        assert (
            reg.get_sample_value("pdserve_kv_disk_demotions_total", {"node_id": "n0", "result": "written"})
            >= 2
        )
        assert reg.get_sample_value("pdserve_kv_disk_used_bytes", {"node_id": "n0"}) > 0
        assert reg.get_sample_value("pdserve_kv_disk_read_bytes_per_second", {"node_id": "n0"}) > 0
    finally:
        store.close()
    assert DiskTierStats.empty(7).capacity_bytes == 7 and not DiskTierStats.empty().disk_full
    plain = BlockStore(StoreConfig("p", L, 2, use_shm=False))
    try:
        assert stats_from_proto(stats_to_proto(plain.stats())).disk is None
    finally:
        plain.close()


BASE = ["--node-id", "kv0", "--capacity-blocks", "8", "--model-id", "m", "--num-layers", "1"]
BASE += ["--num-kv-heads", "1", "--head-dim", "8"]


def test_disk_tier_flags(tmp_path: Path, capsys) -> None:
    cfg = parse_config([*BASE, "--disk-tier", str(tmp_path / "t"), "--disk-tier-gib", "0.5"])
    assert cfg.disk_tier == DiskTierConfig(str(tmp_path / "t"), 1 << 29)
    assert parse_config(BASE).disk_tier is None
    bad = [
        (["--disk-tier", str(tmp_path)], "--disk-tier needs --disk-tier-gib"),
        (["--disk-tier-gib", "1"], "--disk-tier-gib needs --disk-tier PATH"),
        (["--disk-tier", str(tmp_path), "--disk-tier-gib", "0"], "--disk-tier-gib must be a number > 0"),
        (["--disk-tier", str(tmp_path), "--disk-tier-gib", "nan"], "--disk-tier-gib must be a number > 0"),
        (["--disk-tier", str(tmp_path), "--disk-tier-gib", "-1"], "--disk-tier-gib must be a number > 0"),
    ]
    f = tmp_path / "file"
    f.write_text("x")
    bad.append((["--disk-tier", str(f), "--disk-tier-gib", "1"], "exists and is not a directory"))
    for extra, msg in bad:
        with pytest.raises(SystemExit):
            parse_config([*BASE, *extra])
        assert msg in capsys.readouterr().err
    with pytest.raises(DiskTierSizeError, match="holds fewer than 2 KV blocks"):
        DiskTier(DiskTierConfig(str(tmp_path), 600), NB, disk_fingerprint(L))
    with pytest.raises(ValueError, match="at most half the capacity"):
        DiskTierConfig(str(tmp_path), 1000, segment_bytes=600)
    with pytest.raises(SystemExit):
        parse_config(
            [*BASE, "--disk-tier", str(tmp_path), "--disk-tier-gib", "1", "--disk-tier-segment-mib", "600"]
        )
    assert "--disk-tier-segment-mib 600 must be at most half of --disk-tier-gib 1" in capsys.readouterr().err
    assert disk_tier_config(None, None) is None


def test_concurrent_reads_of_overlapping_disk_blocks_all_get_their_bytes(tmp_path: Path) -> None:
    """Readers promoting overlapping sets in opposite orders wait for each other's promotions
    without deadlock, and every read gets its block's bytes."""
    import random
    import threading

    store = make_store(tmp_path, capacity_blocks=16)
    try:
        hs, data = blocks(40)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        errors: list[BaseException] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(25):
                    i, j = rng.sample(range(24), 2)  # mostly disk-only blocks
                    pair = [hs[i], hs[j]] if seed % 2 else [hs[j], hs[i]]
                    with store.pinned_views(pair) as views:
                        assert [bytes(v) for v in views] == [data[hs.index(h)] for h in pair]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "readers hung"
        assert not errors, errors[0]
        assert store.stats().disk.checksum_failures == 0  # type: ignore[union-attr]
    finally:
        store.close()


class CountingFiles(OsFileLayer):
    """The OS file layer, counting appends and fsyncs."""

    def __init__(self) -> None:
        self.writes = 0
        self.fsyncs = 0

    def write(self, fd: int, parts) -> None:
        self.writes += 1
        super().write(fd, parts)

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        super().fsync(fd)


def test_no_fsync_per_block_only_per_sealed_segment(tmp_path: Path) -> None:
    """Demotion appends without an fsync per block (or per write): a segment is fsynced once,
    when it is sealed (full, or at close)."""
    files = CountingFiles()
    store = make_store(tmp_path, capacity_blocks=1, files=files, segment=16 * REC)
    try:
        hs, data = blocks(25)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
            assert store.disk is not None and store.disk.flush()  # one append per block
        assert files.writes >= 24  # 24 demoted blocks, written one at a time (+ segment headers)
        # 24 blocks in 16-record segments: the first segment was sealed full, the second is open
        assert len(segments(tmp_path)) == 2 and files.fsyncs == 1
    finally:
        store.close()
    assert files.fsyncs == 2  # the second segment, sealed at close
    again = make_store(tmp_path, capacity_blocks=1)
    try:
        assert again.stats().disk.recovered_blocks == 24  # type: ignore[union-attr]
        assert again.get_block(hs[23]) == data[23]
    finally:
        again.close()


class GatedReads(OsFileLayer):
    """The OS file layer whose block reads wait until ``gate`` is set (at most 5 s)."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.reads = 0

    def read_into(self, path: str, offset: int, dest: memoryview) -> int:
        self.reads += 1
        self.gate.wait(5.0)
        return super().read_into(path, offset, dest)


def test_lookup_returns_before_its_promotion_reads_the_disk(tmp_path: Path) -> None:
    """A Lookup that finds disk blocks starts their promotion and returns without waiting for it:
    the disk reads are still blocked when it has returned, and the blocks arrive in DRAM once they
    finish."""
    index = InMemoryIndex()
    files = GatedReads()
    store = make_store(tmp_path, index=index, files=files)
    try:
        hs, data = blocks(6)
        for h, d in zip(hs, data, strict=True):
            store.put_block(h, d)
        assert store.disk is not None and store.disk.flush()
        t0 = time.monotonic()
        r = store.lookup(hs[:2])
        took = time.monotonic() - t0
        assert r.num_prefix_blocks == 2 and r.disk_blocks_by_node() == {"n0": 2}
        assert took < 2.0  # did not wait for the (gated, up to 5 s) reads
        wait_for(lambda: files.reads >= 1)  # the promotion has started reading in the background
        assert store.node.slot_of(hs[0]) is None and store.node.slot_of(hs[1]) is None
        files.gate.set()
        wait_for(lambda: store.node.slot_of(hs[0]) is not None and store.node.slot_of(hs[1]) is not None)
        assert tiers_of(index, hs[:2]) == [Tier.DRAM, Tier.DRAM]
        assert store.get_block(hs[0]) == data[0]
    finally:
        files.gate.set()
        store.close()
