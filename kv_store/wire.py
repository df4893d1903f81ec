"""Hand-rolled protobuf encoding of the bulk KV messages (GetChunk, PutChunk, PutBlocksRequest), zero-copy.

The generic protobuf runtime copies a chunk's payload several times (into the message, into the
serialized bytes, out again on parse). For the two messages that carry block bytes this module
produces and reads the *same wire format* with one copy on each side:

* :func:`encode_chunk` serialises the small header fields with protobuf and appends the payload
  field (``data``) by hand: ``header + tag + varint(len) + payload`` in one ``bytes.join``.
* :func:`encode_put_blocks` writes a whole PutBlocksRequest (header fields by protobuf, each
  nested PutBlock by hand) with one copy of the blocks' bytes.
* :func:`decode_get_chunk` walks the wire format and returns the payload as a ``memoryview`` of
  the received message (no copy); unknown fields are skipped as protobuf would.

Protobuf semantics make this exact: a message's serialisation is the concatenation of its fields,
in any order. ``tests/unit/test_kv_wire.py`` checks equivalence with the protobuf runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from pdserve.v1 import kv_store_pb2

_GET_FIELDS = kv_store_pb2.GetChunk.DESCRIPTOR.fields_by_name
_GET_INDEX = _GET_FIELDS["block_index"].number
_GET_HASH = _GET_FIELDS["block_hash"].number
_GET_TOTAL = _GET_FIELDS["total_bytes"].number
_GET_DATA = _GET_FIELDS["data"].number
_GET_CHECKSUM = _GET_FIELDS["checksum"].number  # fixed64
_PUT_DATA = kv_store_pb2.PutChunk.DESCRIPTOR.fields_by_name["data"].number
_LEN = 2  # wire type of length-delimited fields
_FIXED64 = 1  # wire type of fixed64 fields
_PB_FIELDS = kv_store_pb2.PutBlock.DESCRIPTOR.fields_by_name
_PB_HASH_TAG = bytes([_PB_FIELDS["block_hash"].number << 3 | _LEN])
_PB_CHECKSUM_TAG = bytes([_PB_FIELDS["checksum"].number << 3 | _FIXED64])
_PB_DATA_TAG = bytes([_PB_FIELDS["data"].number << 3 | _LEN])
_PBR_BLOCKS_TAG = bytes(
    [kv_store_pb2.PutBlocksRequest.DESCRIPTOR.fields_by_name["blocks"].number << 3 | _LEN]
)
# bytes a PutBlocksRequest spends on one block besides its data (tags, lengths, a 16-byte hash
# and the checksum; hashes are 16 bytes, this bounds any hash up to 64): a caller's size estimate
PUT_BLOCK_OVERHEAD = 96


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def encode_chunk(header: Any, payload: Any) -> bytes:
    """Serialise ``header`` (a GetChunk/PutChunk without ``data``) plus ``payload`` as its data."""
    field = _GET_DATA if isinstance(header, kv_store_pb2.GetChunk) else _PUT_DATA
    n = memoryview(payload).nbytes
    if not n:
        return header.SerializeToString()
    return b"".join((header.SerializeToString(), _varint(field << 3 | _LEN), _varint(n), payload))


def encode_put_blocks(
    header: Any, hashes: Sequence[bytes], checksums: Sequence[int], payloads: Sequence[Any]
) -> bytes:
    """Serialise ``header`` (a PutBlocksRequest with layout / lease_ttl_s, no blocks; or its
    serialisation, ``bytes``) plus one PutBlock per ``(hashes[i], checksums[i], payloads[i])``: the
    bytes protobuf would produce, with one copy of each payload (into the returned message)."""
    parts: list[Any] = [header if isinstance(header, bytes) else header.SerializeToString()]
    for h, c, p in zip(hashes, checksums, payloads, strict=True):
        n = memoryview(p).nbytes
        head = b"".join((_PB_HASH_TAG, _varint(len(h)), h, _PB_CHECKSUM_TAG, c.to_bytes(8, "little")))
        tail = b"".join((_PB_DATA_TAG, _varint(n))) if n else b""
        parts += (_PBR_BLOCKS_TAG, _varint(len(head) + len(tail) + n), head, tail)
        if n:
            parts.append(p)
    return b"".join(parts)


class GetChunkView(NamedTuple):
    block_index: int
    block_hash: bytes
    total_bytes: int
    data: memoryview  # aliases the received message
    checksum: int = 0  # on a block's first chunk: its stored XXH3-64


def decode_get_chunk(raw: bytes) -> GetChunkView:
    """Parse a serialised GetChunk without copying ``data``. ValueError on malformed input."""
    buf = memoryview(raw)
    pos = 0
    block_index = total = 0
    block_hash = b""
    checksum = 0
    data = buf[0:0]
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
            if num == _GET_INDEX:
                block_index = val
            elif num == _GET_TOTAL:
                total = val
        elif wt == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated length-delimited field")
            if num == _GET_HASH:
                block_hash = bytes(buf[pos : pos + n])
            elif num == _GET_DATA:
                data = buf[pos : pos + n]
            pos += n
        elif wt == 1:
            if num == _GET_CHECKSUM and pos + 8 <= end:
                checksum = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > end:
            raise ValueError("truncated field")
    return GetChunkView(block_index, block_hash, total, data, checksum)
