from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

from pdserve.v1 import common_pb2 as _common_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class StorageTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORAGE_TIER_UNSPECIFIED: _ClassVar[StorageTier]
    STORAGE_TIER_DRAM: _ClassVar[StorageTier]
    STORAGE_TIER_DISK: _ClassVar[StorageTier]

STORAGE_TIER_UNSPECIFIED: StorageTier
STORAGE_TIER_DRAM: StorageTier
STORAGE_TIER_DISK: StorageTier

class PutChunk(_message.Message):
    __slots__ = ("layout", "lease_ttl_s", "block_hash", "total_bytes", "data", "checksum")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    lease_ttl_s: float
    block_hash: bytes
    total_bytes: int
    data: bytes
    checksum: int
    def __init__(
        self,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
        lease_ttl_s: float | None = ...,
        block_hash: bytes | None = ...,
        total_bytes: int | None = ...,
        data: bytes | None = ...,
        checksum: int | None = ...,
    ) -> None: ...

class PutBlocksRequest(_message.Message):
    __slots__ = ("layout", "lease_ttl_s", "blocks")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    lease_ttl_s: float
    blocks: _containers.RepeatedCompositeFieldContainer[PutBlock]
    def __init__(
        self,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
        lease_ttl_s: float | None = ...,
        blocks: _Iterable[PutBlock | _Mapping] | None = ...,
    ) -> None: ...

class PutBlock(_message.Message):
    __slots__ = ("block_hash", "checksum", "data")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    checksum: int
    data: bytes
    def __init__(
        self, block_hash: bytes | None = ..., checksum: int | None = ..., data: bytes | None = ...
    ) -> None: ...

class PutResponse(_message.Message):
    __slots__ = (
        "num_blocks",
        "num_stored",
        "num_existing",
        "lease_id",
        "lease_expires_at_unix_s",
        "location",
        "slots",
        "slot_nbytes",
        "shm_name",
        "conflicts",
        "lease_ttl_s",
        "lease_ttl_clamped",
        "conflict_checksums",
    )
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_EXISTING_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_CLAMPED_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    num_stored: int
    num_existing: int
    lease_id: str
    lease_expires_at_unix_s: float
    location: _common_pb2.BlockLocation
    slots: _containers.RepeatedScalarFieldContainer[int]
    slot_nbytes: int
    shm_name: str
    conflicts: _containers.RepeatedScalarFieldContainer[int]
    lease_ttl_s: float
    lease_ttl_clamped: bool
    conflict_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        num_blocks: int | None = ...,
        num_stored: int | None = ...,
        num_existing: int | None = ...,
        lease_id: str | None = ...,
        lease_expires_at_unix_s: float | None = ...,
        location: _common_pb2.BlockLocation | _Mapping | None = ...,
        slots: _Iterable[int] | None = ...,
        slot_nbytes: int | None = ...,
        shm_name: str | None = ...,
        conflicts: _Iterable[int] | None = ...,
        lease_ttl_s: float | None = ...,
        lease_ttl_clamped: bool | None = ...,
        conflict_checksums: _Iterable[int] | None = ...,
    ) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("block_hashes", "layout")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    layout: _common_pb2.KVLayout
    def __init__(
        self,
        block_hashes: _Iterable[bytes] | None = ...,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
    ) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("block_index", "block_hash", "total_bytes", "data", "checksum")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    block_hash: bytes
    total_bytes: int
    data: bytes
    checksum: int
    def __init__(
        self,
        block_index: int | None = ...,
        block_hash: bytes | None = ...,
        total_bytes: int | None = ...,
        data: bytes | None = ...,
        checksum: int | None = ...,
    ) -> None: ...

class ExistsRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Iterable[bytes] | None = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, exists: _Iterable[bool] | None = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Iterable[bytes] | None = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_deleted", "num_missing", "num_pinned")
    NUM_DELETED_FIELD_NUMBER: _ClassVar[int]
    NUM_MISSING_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    num_deleted: int
    num_missing: int
    num_pinned: int
    def __init__(
        self, num_deleted: int | None = ..., num_missing: int | None = ..., num_pinned: int | None = ...
    ) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Iterable[bytes] | None = ...) -> None: ...

class BlockLocations(_message.Message):
    __slots__ = ("locations", "tiers")
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    locations: _containers.RepeatedCompositeFieldContainer[_common_pb2.BlockLocation]
    tiers: _containers.RepeatedScalarFieldContainer[StorageTier]
    def __init__(
        self,
        locations: _Iterable[_common_pb2.BlockLocation | _Mapping] | None = ...,
        tiers: _Iterable[StorageTier | str] | None = ...,
    ) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_prefix_blocks", "blocks")
    NUM_PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_prefix_blocks: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockLocations]
    def __init__(
        self, num_prefix_blocks: int | None = ..., blocks: _Iterable[BlockLocations | _Mapping] | None = ...
    ) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("block_hashes", "ttl_s", "layout", "release_lease_ids")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    layout: _common_pb2.KVLayout
    release_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        block_hashes: _Iterable[bytes] | None = ...,
        ttl_s: float | None = ...,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
        release_lease_ids: _Iterable[str] | None = ...,
    ) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = (
        "lease_id",
        "ttl_s",
        "expires_at_unix_s",
        "shm_name",
        "slot_nbytes",
        "slots",
        "location",
        "checksums",
        "ttl_clamped",
    )
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    TTL_CLAMPED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl_s: float
    expires_at_unix_s: float
    shm_name: str
    slot_nbytes: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    location: _common_pb2.BlockLocation
    checksums: _containers.RepeatedScalarFieldContainer[int]
    ttl_clamped: bool
    def __init__(
        self,
        lease_id: str | None = ...,
        ttl_s: float | None = ...,
        expires_at_unix_s: float | None = ...,
        shm_name: str | None = ...,
        slot_nbytes: int | None = ...,
        slots: _Iterable[int] | None = ...,
        location: _common_pb2.BlockLocation | _Mapping | None = ...,
        checksums: _Iterable[int] | None = ...,
        ttl_clamped: bool | None = ...,
    ) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "shm_read_blocks")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_READ_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    shm_read_blocks: int
    def __init__(self, lease_id: str | None = ..., shm_read_blocks: int | None = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool | None = ...) -> None: ...

class ReleaseBatchItem(_message.Message):
    __slots__ = ("release", "request_id")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    release: ReleaseRequest
    request_id: str
    def __init__(
        self, release: ReleaseRequest | _Mapping | None = ..., request_id: str | None = ...
    ) -> None: ...

class ReleaseBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReleaseBatchItem]
    def __init__(self, items: _Iterable[ReleaseBatchItem | _Mapping] | None = ...) -> None: ...

class ReleaseBatchResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, released: _Iterable[bool] | None = ...) -> None: ...

class KVStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreStats(_message.Message):
    __slots__ = (
        "location",
        "layout",
        "capacity_blocks",
        "num_blocks",
        "bytes_used",
        "capacity_bytes",
        "num_pinned",
        "num_leases",
        "evictions",
        "hits",
        "misses",
        "puts",
        "put_dedups",
        "expired_leases",
        "num_pending",
        "checksum_failures",
        "put_conflicts",
        "lease_ttl_clamps",
        "lease_quota_refusals",
        "denied_calls",
        "disk_tier_enabled",
        "disk_capacity_bytes",
        "disk_bytes_used",
        "disk_blocks",
        "disk_demotions",
        "disk_promotions",
        "disk_read_misses",
        "disk_checksum_failures",
        "disk_full",
        "disk_read_bytes_per_s",
        "disk_segment_evictions",
        "disk_demotions_dropped",
    )
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    PUT_DEDUPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    PUT_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_CLAMPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_QUOTA_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    DENIED_CALLS_FIELD_NUMBER: _ClassVar[int]
    DISK_TIER_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_MISSES_FIELD_NUMBER: _ClassVar[int]
    DISK_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    DISK_FULL_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DISK_SEGMENT_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_DEMOTIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    location: _common_pb2.BlockLocation
    layout: _common_pb2.KVLayout
    capacity_blocks: int
    num_blocks: int
    bytes_used: int
    capacity_bytes: int
    num_pinned: int
    num_leases: int
    evictions: int
    hits: int
    misses: int
    puts: int
    put_dedups: int
    expired_leases: int
    num_pending: int
    checksum_failures: int
    put_conflicts: int
    lease_ttl_clamps: int
    lease_quota_refusals: int
    denied_calls: int
    disk_tier_enabled: bool
    disk_capacity_bytes: int
    disk_bytes_used: int
    disk_blocks: int
    disk_demotions: int
    disk_promotions: int
    disk_read_misses: int
    disk_checksum_failures: int
    disk_full: bool
    disk_read_bytes_per_s: float
    disk_segment_evictions: int
    disk_demotions_dropped: int
    def __init__(
        self,
        location: _common_pb2.BlockLocation | _Mapping | None = ...,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
        capacity_blocks: int | None = ...,
        num_blocks: int | None = ...,
        bytes_used: int | None = ...,
        capacity_bytes: int | None = ...,
        num_pinned: int | None = ...,
        num_leases: int | None = ...,
        evictions: int | None = ...,
        hits: int | None = ...,
        misses: int | None = ...,
        puts: int | None = ...,
        put_dedups: int | None = ...,
        expired_leases: int | None = ...,
        num_pending: int | None = ...,
        checksum_failures: int | None = ...,
        put_conflicts: int | None = ...,
        lease_ttl_clamps: int | None = ...,
        lease_quota_refusals: int | None = ...,
        denied_calls: int | None = ...,
        disk_tier_enabled: bool | None = ...,
        disk_capacity_bytes: int | None = ...,
        disk_bytes_used: int | None = ...,
        disk_blocks: int | None = ...,
        disk_demotions: int | None = ...,
        disk_promotions: int | None = ...,
        disk_read_misses: int | None = ...,
        disk_checksum_failures: int | None = ...,
        disk_full: bool | None = ...,
        disk_read_bytes_per_s: float | None = ...,
        disk_segment_evictions: int | None = ...,
        disk_demotions_dropped: int | None = ...,
    ) -> None: ...
