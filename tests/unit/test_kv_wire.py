"""kv_store/wire.py produces and reads exactly the protobuf wire format of GetChunk/PutChunk."""

from __future__ import annotations

import os

import pytest

from kv_store.wire import decode_get_chunk, encode_chunk
from pdserve.v1 import common_pb2, kv_store_pb2


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 1 << 20])
def test_get_chunk_round_trip_with_protobuf(n: int) -> None:
    payload = os.urandom(n)
    header = kv_store_pb2.GetChunk(block_index=7, block_hash=b"h" * 16, total_bytes=1 << 21)
    raw = encode_chunk(header, memoryview(payload))
    ref = kv_store_pb2.GetChunk.FromString(raw)
    assert (ref.block_index, ref.block_hash, ref.total_bytes, ref.data) == (7, b"h" * 16, 1 << 21, payload)
    full = kv_store_pb2.GetChunk(block_index=7, block_hash=b"h" * 16, total_bytes=1 << 21, data=payload)
    v = decode_get_chunk(full.SerializeToString())
    assert (v.block_index, v.block_hash, v.total_bytes, bytes(v.data)) == (7, b"h" * 16, 1 << 21, payload)


def test_decode_is_zero_copy_and_skips_unknown_fields() -> None:
    raw = kv_store_pb2.GetChunk(block_index=2, data=b"abcdef").SerializeToString()
    # unknown fields: 15 (varint), 16 (fixed64), 21 (fixed32), 22 (length-delimited)
    unknown = b"\x78\x05" + b"\x81\x01" + bytes(8) + b"\xad\x01" + bytes(4) + b"\xb2\x01\x02zz"
    v = decode_get_chunk(unknown + raw)
    assert v.block_index == 2 and bytes(v.data) == b"abcdef" and v.block_hash == b""
    assert kv_store_pb2.GetChunk.FromString(unknown + raw).data == b"abcdef"  # protobuf agrees
    msg = unknown + raw
    v = decode_get_chunk(msg)
    assert v.data.obj is msg  # a view into the received message, not a copy


def test_put_chunk_encoding_matches_protobuf() -> None:
    header = kv_store_pb2.PutChunk(
        layout=common_pb2.KVLayout(model_id="m", num_layers=1),
        lease_ttl_s=2.5,
        block_hash=b"x" * 16,
        total_bytes=9,
    )
    raw = encode_chunk(header, b"123456789")
    ref = kv_store_pb2.PutChunk.FromString(raw)
    assert ref.layout.model_id == "m" and ref.lease_ttl_s == 2.5 and ref.data == b"123456789"


@pytest.mark.parametrize(
    "raw", [b"\x22\x05abc", b"\x08", b"\x22", b"\x0f", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
)
def test_malformed_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_get_chunk(raw)
