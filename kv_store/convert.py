"""Protobuf <-> kv_store value types: the one converter module of this package.

``*_from_proto`` functions validate: a malformed message raises :class:`InvalidRequestError`.
"""

from __future__ import annotations

from kv_store.disk_tier import DiskTierStats
from kv_store.handle import BlockLocation, KVHandle
from kv_store.index import LookupResult, Tier
from kv_store.layout import KVLayout
from kv_store.node import DeleteResult, NodeStats
from kv_store.store import DeleteCounts, LeaseGrant, PutResult, StoreStats
from pdserve.errors import InvalidRequestError
from pdserve.v1 import common_pb2, kv_store_pb2


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model_id=layout.model_id,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
    )


def layout_from_proto(msg: common_pb2.KVLayout, what: str = "layout") -> KVLayout:
    try:
        return KVLayout(
            model_id=msg.model_id,
            num_layers=msg.num_layers,
            num_kv_heads=msg.num_kv_heads,
            head_dim=msg.head_dim,
            dtype=msg.dtype,
            block_size=msg.block_size,
        )
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{what}: {e.message}") from None


def required_layout(msg: object, what: str) -> KVLayout:
    """The ``layout`` field of a request message, which must be set."""
    if not msg.HasField("layout"):  # type: ignore[attr-defined]
        raise InvalidRequestError(f"{what}: layout is required (the KVLayout the blocks were produced with)")
    return layout_from_proto(msg.layout, f"{what}.layout")  # type: ignore[attr-defined]


def location_to_proto(loc: BlockLocation) -> common_pb2.BlockLocation:
    return common_pb2.BlockLocation(
        node_id=loc.node_id, address=loc.address, shm_name=loc.shm_name, host_id=loc.host_id
    )


def location_from_proto(msg: common_pb2.BlockLocation) -> BlockLocation:
    return BlockLocation(node_id=msg.node_id, address=msg.address, shm_name=msg.shm_name, host_id=msg.host_id)


def handle_to_proto(h: KVHandle) -> common_pb2.KVHandle:
    return common_pb2.KVHandle(
        request_id=h.request_id,
        block_hashes=list(h.block_hashes),
        locations=[location_to_proto(loc) for loc in h.locations],
        layout=layout_to_proto(h.layout),
        num_tokens=h.num_tokens,
        lease_id=h.lease_id,
        shm_slots=list(h.shm_slots),
        lease_expires_at_unix_s=h.lease_expires_at_unix_s,
        dist_address=h.dist_address,
        dist_rank=h.dist_rank,
        block_checksums=list(h.block_checksums),
    )


def handle_from_proto(msg: common_pb2.KVHandle) -> KVHandle:
    layout = required_layout(msg, "KVHandle")
    locs = [location_from_proto(loc) for loc in msg.locations]
    return KVHandle(
        request_id=msg.request_id,
        block_hashes=tuple(msg.block_hashes),
        locations=tuple(locs),
        layout=layout,
        num_tokens=msg.num_tokens,
        lease_id=msg.lease_id,
        shm_slots=tuple(msg.shm_slots),
        lease_expires_at_unix_s=msg.lease_expires_at_unix_s,
        dist_address=msg.dist_address,
        dist_rank=msg.dist_rank,
        block_checksums=tuple(msg.block_checksums),
    )


_TIER_TO_PROTO = {Tier.DRAM: kv_store_pb2.STORAGE_TIER_DRAM, Tier.DISK: kv_store_pb2.STORAGE_TIER_DISK}
_TIER_FROM_PROTO = {
    kv_store_pb2.STORAGE_TIER_UNSPECIFIED: Tier.DRAM,
    kv_store_pb2.STORAGE_TIER_DRAM: Tier.DRAM,
    kv_store_pb2.STORAGE_TIER_DISK: Tier.DISK,
}


def lookup_to_proto(r: LookupResult) -> kv_store_pb2.LookupResponse:
    tiers = r.tiers or tuple(() for _ in r.locations)
    return kv_store_pb2.LookupResponse(
        num_prefix_blocks=r.num_prefix_blocks,
        blocks=[
            kv_store_pb2.BlockLocations(
                locations=[location_to_proto(x) for x in locs], tiers=[_TIER_TO_PROTO[t] for t in ts]
            )
            for locs, ts in zip(r.locations, tiers, strict=True)
        ],
    )


def lookup_from_proto(msg: kv_store_pb2.LookupResponse) -> LookupResult:
    locs = tuple(tuple(location_from_proto(x) for x in b.locations) for b in msg.blocks)
    tiers: tuple[tuple[Tier, ...], ...] = ()
    if any(b.tiers for b in msg.blocks):
        for i, b in enumerate(msg.blocks):
            if b.tiers and len(b.tiers) != len(b.locations):
                raise InvalidRequestError(
                    f"LookupResponse.blocks[{i}]: {len(b.tiers)} tiers for {len(b.locations)} locations"
                )
        tiers = tuple(
            tuple(_TIER_FROM_PROTO.get(t, Tier.DRAM) for t in b.tiers)
            if b.tiers
            else (Tier.DRAM,) * len(b.locations)
            for b in msg.blocks
        )
    return LookupResult(msg.num_prefix_blocks, locs, tiers)


def lease_to_proto(g: LeaseGrant) -> kv_store_pb2.LeaseResponse:
    return kv_store_pb2.LeaseResponse(
        lease_id=g.lease_id,
        ttl_s=g.ttl_s,
        expires_at_unix_s=g.expires_at_unix_s,
        shm_name=g.shm_name,
        slot_nbytes=g.slot_nbytes,
        slots=list(g.slots),
        location=location_to_proto(g.location),
        checksums=list(g.checksums),
        ttl_clamped=g.ttl_clamped,
    )


def lease_from_proto(msg: kv_store_pb2.LeaseResponse) -> LeaseGrant:
    return LeaseGrant(
        lease_id=msg.lease_id,
        ttl_s=msg.ttl_s,
        expires_at_unix_s=msg.expires_at_unix_s,
        shm_name=msg.shm_name,
        slot_nbytes=msg.slot_nbytes,
        slots=tuple(msg.slots),
        location=location_from_proto(msg.location),
        checksums=tuple(msg.checksums),
        ttl_clamped=msg.ttl_clamped,
    )


def put_result_to_proto(r: PutResult) -> kv_store_pb2.PutResponse:
    msg = kv_store_pb2.PutResponse(
        num_blocks=r.num_blocks,
        num_stored=r.num_stored,
        num_existing=r.num_existing,
        lease_id=r.lease_id,
        lease_expires_at_unix_s=r.lease_expires_at_unix_s,
        slots=list(r.slots),
        slot_nbytes=r.slot_nbytes,
        shm_name=r.shm_name,
        conflicts=list(r.conflicts),
        conflict_checksums=list(r.conflict_checksums),
        lease_ttl_s=r.lease_ttl_s,
        lease_ttl_clamped=r.lease_ttl_clamped,
    )
    if r.location is not None:
        msg.location.CopyFrom(location_to_proto(r.location))
    return msg


def put_result_from_proto(msg: kv_store_pb2.PutResponse) -> PutResult:
    return PutResult(
        num_blocks=msg.num_blocks,
        num_stored=msg.num_stored,
        num_existing=msg.num_existing,
        lease_id=msg.lease_id,
        lease_expires_at_unix_s=msg.lease_expires_at_unix_s,
        location=location_from_proto(msg.location) if msg.HasField("location") else None,
        slots=tuple(msg.slots),
        slot_nbytes=msg.slot_nbytes,
        shm_name=msg.shm_name,
        conflicts=tuple(msg.conflicts),
        conflict_checksums=tuple(msg.conflict_checksums),
        lease_ttl_s=msg.lease_ttl_s,
        lease_ttl_clamped=msg.lease_ttl_clamped,
    )


def delete_to_proto(r: DeleteResult) -> kv_store_pb2.DeleteResponse:
    return kv_store_pb2.DeleteResponse(
        num_deleted=len(r.deleted), num_missing=r.num_missing, num_pinned=r.num_pinned
    )


def delete_from_proto(msg: kv_store_pb2.DeleteResponse) -> DeleteCounts:
    return DeleteCounts(msg.num_deleted, msg.num_missing, msg.num_pinned)


def stats_to_proto(s: StoreStats) -> kv_store_pb2.KVStoreStats:
    n = s.node
    return kv_store_pb2.KVStoreStats(
        location=location_to_proto(s.location),
        layout=layout_to_proto(s.layout),
        capacity_blocks=n.capacity_blocks,
        num_blocks=n.num_blocks,
        bytes_used=n.bytes_used,
        capacity_bytes=n.capacity_bytes,
        num_pinned=n.num_pinned,
        num_leases=n.num_leases,
        evictions=n.evictions,
        hits=n.hits,
        misses=n.misses,
        puts=n.puts,
        put_dedups=n.put_dedups,
        expired_leases=n.expired_leases,
        num_pending=n.num_pending,
        checksum_failures=n.checksum_failures,
        put_conflicts=n.put_conflicts,
        lease_ttl_clamps=n.lease_ttl_clamps,
        lease_quota_refusals=n.lease_quota_refusals,
        denied_calls=n.denied_calls,
        **_disk_stats_fields(s),
    )


def _disk_stats_fields(s: StoreStats) -> dict[str, object]:
    d = s.disk
    if d is None:
        return {}
    return {
        "disk_tier_enabled": True,
        "disk_capacity_bytes": d.capacity_bytes,
        "disk_bytes_used": d.bytes_used,
        "disk_blocks": d.num_blocks,
        "disk_demotions": d.demotions,
        "disk_promotions": s.promotions,
        "disk_read_misses": d.read_misses,
        "disk_checksum_failures": d.checksum_failures,
        "disk_full": d.disk_full,
        "disk_read_bytes_per_s": d.read_bytes_per_s,
        "disk_segment_evictions": d.segment_evictions,
        "disk_demotions_dropped": d.demotions_dropped,
    }


def stats_from_proto(msg: kv_store_pb2.KVStoreStats) -> StoreStats:
    node = NodeStats(
        capacity_blocks=msg.capacity_blocks,
        num_blocks=msg.num_blocks,
        num_pending=msg.num_pending,
        num_pinned=msg.num_pinned,
        bytes_used=msg.bytes_used,
        capacity_bytes=msg.capacity_bytes,
        num_leases=msg.num_leases,
        evictions=msg.evictions,
        expired_leases=msg.expired_leases,
        hits=msg.hits,
        misses=msg.misses,
        puts=msg.puts,
        put_dedups=msg.put_dedups,
        checksum_failures=msg.checksum_failures,
        put_conflicts=msg.put_conflicts,
        lease_ttl_clamps=msg.lease_ttl_clamps,
        lease_quota_refusals=msg.lease_quota_refusals,
        denied_calls=msg.denied_calls,
    )
    disk = None
    if msg.disk_tier_enabled:
        # the wire carries the fields a client needs (KVStoreStats); the rest read 0 here
        disk = DiskTierStats(
            capacity_bytes=msg.disk_capacity_bytes,
            bytes_used=msg.disk_bytes_used,
            num_blocks=msg.disk_blocks,
            num_pending=0,
            num_segments=0,
            demotions=msg.disk_demotions,
            demotions_dropped=msg.disk_demotions_dropped,
            promotion_reads=msg.disk_promotions,
            read_misses=msg.disk_read_misses,
            checksum_failures=msg.disk_checksum_failures,
            missing_files=0,
            write_errors=0,
            full_events=0,
            disk_full=msg.disk_full,
            demotion_paused=msg.disk_full,
            segment_evictions=msg.disk_segment_evictions,
            recovered_blocks=0,
            read_bytes=0,
            read_seconds=0.0,
            read_bytes_per_s=msg.disk_read_bytes_per_s,
        )
    return StoreStats(
        location_from_proto(msg.location), layout_from_proto(msg.layout), node, disk, msg.disk_promotions
    )
