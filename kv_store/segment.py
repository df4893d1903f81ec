"""Segment files of a store node's disk tier: format, scan, and the file-system seam.

A *segment* is one append-only file holding many KV blocks (Mooncake's SSD tier writes large
files, not a file and an fsync per block). Layout, little-endian::

    file header   b"PDKVSEG1" | u32 n | n bytes of JSON {"layout": ..., "block_nbytes": ...} | u32 xxh32(JSON)
    record        b"PDKB" | u16 version | u16 flags | 16-byte block key | u64 checksum | u64 nbytes
                  | u32 xxh32(the 40 bytes before) | nbytes of block data
    record ...

Contracts:

* The header names the KV layout of every block in the file; a reader with another layout must
  not serve them (:class:`ForeignSegmentError`).
* A record's header carries its own checksum, so a scan trusts ``nbytes`` only from an intact
  header. The block's data checksum (XXH3-64, :mod:`kv_store.checksum`) is the writer's and is
  verified when the block is read, never at scan time (lazy: a restart reads headers only).
* :func:`scan_records` stops at the first record that is incomplete (a crash or a full disk
  mid-append: truncated tail) or whose header is damaged; records before it are returned.
  Records after a damaged header cannot be located and are lost (a miss, never wrong bytes).

:class:`FileLayer` is the I/O seam (the disk tier does all file-system calls through it);
:class:`OsFileLayer` is the real one. Tests inject faults (ENOSPC, I/O errors) with a wrapper.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import xxhash

from engine.block_hash import BlockHash

SEGMENT_MAGIC = b"PDKVSEG1"
RECORD_MAGIC = b"PDKB"
RECORD_VERSION = 1
SEGMENT_SUFFIX = ".kvseg"
KEY_NBYTES = 16
_REC_BODY = struct.Struct("<4sHH16sQQ")  # magic, version, flags, key, checksum, nbytes
_REC_CRC = struct.Struct("<I")
RECORD_HEADER_NBYTES = _REC_BODY.size + _REC_CRC.size  # 44
_U32 = struct.Struct("<I")


class ForeignSegmentError(ValueError):
    """A segment file written for another KV layout (or not a segment at all)."""


@dataclass(frozen=True)
class RecordHeader:
    """One block's record: where its data starts in the file and what it must hash to."""

    block_hash: BlockHash
    checksum: int
    nbytes: int
    data_offset: int  # file offset of the block's first data byte

    @property
    def end(self) -> int:
        return self.data_offset + self.nbytes


def segment_name(seq: int) -> str:
    """File name of segment number ``seq`` (sorts in write order)."""
    return f"{seq:012d}{SEGMENT_SUFFIX}"


def segment_seq(name: str) -> int | None:
    """Segment number of a file name, or None if it is not a segment file."""
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[: -len(SEGMENT_SUFFIX)]
    return int(stem) if stem.isdigit() else None


def layout_fingerprint(layout_json: dict[str, object], block_nbytes: int) -> bytes:
    """The JSON a segment header carries for a layout (stable key order)."""
    return json.dumps({"layout": layout_json, "block_nbytes": block_nbytes}, sort_keys=True).encode()


def encode_segment_header(fingerprint: bytes) -> bytes:
    return (
        SEGMENT_MAGIC
        + _U32.pack(len(fingerprint))
        + fingerprint
        + _U32.pack(xxhash.xxh32_intdigest(fingerprint))
    )


def decode_segment_header(buf: bytes) -> tuple[bytes, int]:
    """(fingerprint, header length) of a segment file's first bytes; ForeignSegmentError if they
    are not an intact segment header (``buf`` must hold at least the whole header)."""
    if len(buf) < len(SEGMENT_MAGIC) + 8 or buf[: len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        raise ForeignSegmentError("not a pdserve KV segment file (bad magic or too short)")
    p = len(SEGMENT_MAGIC)
    (n,) = _U32.unpack_from(buf, p)
    p += 4
    if n > 1 << 20 or len(buf) < p + n + 4:
        raise ForeignSegmentError("segment header is truncated or damaged")
    fp = bytes(buf[p : p + n])
    (crc,) = _U32.unpack_from(buf, p + n)
    if crc != xxhash.xxh32_intdigest(fp):
        raise ForeignSegmentError("segment header failed its checksum")
    return fp, p + n + 4


def encode_record_header(h: BlockHash, checksum: int, nbytes: int) -> bytes:
    if len(h) != KEY_NBYTES:
        raise ValueError(f"block keys are {KEY_NBYTES} bytes, got {len(h)}")
    body = _REC_BODY.pack(RECORD_MAGIC, RECORD_VERSION, 0, h, checksum, nbytes)
    return body + _REC_CRC.pack(xxhash.xxh32_intdigest(body))


def decode_record_header(buf: bytes | memoryview, file_offset: int) -> RecordHeader | None:
    """The record header in ``buf`` (read at ``file_offset``), or None if damaged."""
    if len(buf) < RECORD_HEADER_NBYTES:
        return None
    body = bytes(buf[: _REC_BODY.size])
    (crc,) = _REC_CRC.unpack_from(buf, _REC_BODY.size)
    if crc != xxhash.xxh32_intdigest(body):
        return None
    magic, version, _flags, h, checksum, nbytes = _REC_BODY.unpack(body)
    if magic != RECORD_MAGIC or version != RECORD_VERSION:
        return None
    return RecordHeader(h, checksum, nbytes, file_offset + RECORD_HEADER_NBYTES)


class FileLayer(Protocol):
    """The file-system calls of a disk tier (the seam tests fake). Errors are ``OSError``s."""

    def open_append(self, path: str) -> int:
        """A new file for appending (fails if it exists); returns a descriptor."""
        ...

    def write(self, fd: int, parts: Sequence[bytes | memoryview]) -> None:
        """Append all of ``parts`` (a short write is retried until done or an OSError)."""
        ...

    def fsync(self, fd: int) -> None: ...

    def fstat(self, fd: int) -> os.stat_result:
        """The open file's status (its size, and link count 0 once deleted)."""
        ...

    def close(self, fd: int) -> None: ...

    def read_into(self, path: str, offset: int, dest: memoryview) -> int:
        """Read up to ``len(dest)`` bytes at ``offset`` of ``path`` into ``dest``; bytes read
        (fewer at end of file). FileNotFoundError if the file is gone."""
        ...

    def read(self, path: str, offset: int, n: int) -> bytes: ...

    def size(self, path: str) -> int: ...

    def listdir(self, path: str) -> list[str]: ...

    def remove(self, path: str) -> None: ...


class OsFileLayer:
    """:class:`FileLayer` on the operating system (opens a file per read: a file deleted
    underneath is seen at once, not read through a cached descriptor)."""

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)

    def write(self, fd: int, parts: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def read_into(self, path: str, offset: int, dest: memoryview) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            total = len(dest)
            while got < total:
                n = os.preadv(fd, [dest[got:]], offset + got)
                if n <= 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    def read(self, path: str, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        got = self.read_into(path, offset, memoryview(buf))
        return bytes(buf[:got])

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def remove(self, path: str) -> None:
        os.remove(path)


def scan_records(files: FileLayer, path: str, header_nbytes: int) -> Iterator[RecordHeader]:
    """Every intact record of the segment at ``path`` after its ``header_nbytes``-byte file
    header, in file order; stops at a truncated or damaged record (see the module docstring)."""
    size = files.size(path)
    off = header_nbytes
    while off + RECORD_HEADER_NBYTES <= size:
        rec = decode_record_header(files.read(path, off, RECORD_HEADER_NBYTES), off)
        if rec is None or rec.end > size:
            return
        yield rec
        off = rec.end


def read_segment_header(files: FileLayer, path: str) -> tuple[bytes, int]:
    """(fingerprint, header length) of the segment at ``path`` (ForeignSegmentError if none)."""
    head = files.read(path, 0, 4096)
    return decode_segment_header(head)
