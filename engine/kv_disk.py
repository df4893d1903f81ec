"""The engine's disk tier for cold swapped-out KV: preallocated segment files, checksummed slots.

:class:`DiskKVTier` stores ``num_blocks`` KV blocks of ``block_nbytes`` bytes each in a few large
segment files (at most ``segment_bytes`` each, preallocated at start with ``posix_fallocate`` so a
disk too small for the configured size is refused then, not discovered mid-run) under one
directory; slot ``i`` lives at a fixed offset of one segment. There is no file and no fsync per
block: the files are scratch space for one engine process (created exclusively, removed by
:meth:`DiskKVTier.close` or when the tier is garbage-collected) and survive nothing.

The accounting of which request owns which slot is pure and lives elsewhere
(:class:`engine.host_pool.HostBlockPool` as ``KVCacheManager.disk``, ``KVCacheManager.spill`` /
``promote``); this module only moves bytes between host KV slots
(:class:`engine.swap_space.HostKVCache`'s block-major tensor) and disk slots:

* :meth:`DiskKVTier.write` (host -> disk) records a CRC-32 of every block it writes; a write that
  fails (disk full, I/O error, the file made unwritable) leaves the slot invalid and is reported,
  never raised: the caller falls back to recompute for the request that owned it.
* :meth:`DiskKVTier.read` (disk -> host) checks the CRC-32 of every block it reads; a mismatch, a
  short read (a truncated file) or an I/O error reports the slot as bad (the caller recomputes
  the request: a corrupt block is never served).

Both return ``(bytes moved, seconds)`` timings through :meth:`DiskKVTier.take_timings` for the
disk bandwidth estimate (``RateEstimator.observe_disk``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DiskTierStats:
    """Cumulative counters of one :class:`DiskKVTier`."""

    blocks_written: int = 0
    blocks_read: int = 0
    write_errors: int = 0  # blocks whose write failed (disk full, I/O error)
    corrupt_blocks: int = 0  # blocks whose read failed its checksum, came back short or errored
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0  # time spent in writes and reads
    write_seconds: float = 0.0
    read_seconds: float = 0.0


def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class DiskKVTier:
    """``num_blocks`` KV block slots of ``block_nbytes`` bytes in segment files under ``directory``."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        num_blocks: int,
        block_nbytes: int,
        segment_bytes: int = 1 << 30,
    ) -> None:
        """Create and preallocate the segment files. Raises ValueError naming the directory when
        it cannot hold them (missing, not writable, too little space)."""
        if num_blocks < 1 or block_nbytes < 1:
            raise ValueError(
                f"a disk KV tier needs >= 1 block of >= 1 byte, got {num_blocks} x {block_nbytes}"
            )
        self.directory = Path(directory)
        self.num_blocks = num_blocks
        self.block_nbytes = block_nbytes
        self.blocks_per_segment = max(1, segment_bytes // block_nbytes)
        self.stats = DiskTierStats()
        self._crc: list[int | None] = [None] * num_blocks  # checksum of each slot's valid content
        self._timings: list[tuple[int, float]] = []
        self._fds: list[int] = []
        self.paths: list[Path] = []
        tag = f"pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            left = num_blocks
            i = 0
            while left > 0:
                n = min(left, self.blocks_per_segment)
                path = self.directory / f"{tag}-{i}.seg"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                self._fds.append(fd)
                self.paths.append(path)
                try:
                    os.posix_fallocate(fd, 0, n * block_nbytes)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, n * block_nbytes)  # a file system without fallocate: sparse
                left -= n
                i += 1
        except OSError as e:
            self.close()
            raise ValueError(
                f"KV disk tier: cannot create {num_blocks * block_nbytes} bytes of segment files in "
                f"{str(self.directory)!r}: {e.strerror or e}"
            ) from e
        self._finalizer = weakref.finalize(self, DiskKVTier._release, list(self._fds), list(self.paths))

    @staticmethod
    def _release(fds: list[int], paths: list[Path]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove(paths)

    def close(self) -> None:
        """Close and remove the segment files (idempotent)."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        else:
            DiskKVTier._release(self._fds, self.paths)
        self._fds = []

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    def location(self, slot: int) -> tuple[Path, int]:
        """``(segment file, byte offset)`` of a slot (tests, tools)."""
        self._check(slot)
        return self.paths[slot // self.blocks_per_segment], (
            slot % self.blocks_per_segment
        ) * self.block_nbytes

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_blocks:
            raise IndexError(f"disk block {slot} out of range [0, {self.num_blocks})")

    def _where(self, slot: int) -> tuple[int, int]:
        if not self._fds:
            raise OSError(errno.EBADF, "the KV disk tier is closed")
        return self._fds[slot // self.blocks_per_segment], (
            slot % self.blocks_per_segment
        ) * self.block_nbytes

    # ------------------------------------------------------------------ I/O seams (tests fake these)
    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            n = os.pwrite(fd, data[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def _pread(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

    # ------------------------------------------------------------------ copies
    def write(self, host: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> set[int]:
        """Write host blocks ``host[h]`` to disk slots ``d`` for each ``(h, d)``; returns the disk
        slots whose write failed (their content is invalid; every other pair was written and
        checksummed). ``host``: the host KV cache, block-major and contiguous, on the CPU."""
        bad: set[int] = set()
        if not pairs:
            return bad
        t = time.perf_counter()
        moved = 0
        for h, d in pairs:
            self._check(d)
            self._crc[d] = None
            data = _byte_view(host[h])
            if len(data) != self.block_nbytes:
                raise ValueError(f"host block of {len(data)} bytes, the disk tier's are {self.block_nbytes}")
            try:
                fd, off = self._where(d)
                self._pwrite(fd, data, off)
            except OSError:
                bad.add(d)
                continue
            self._crc[d] = zlib.crc32(data)
            moved += self.block_nbytes
        dt = time.perf_counter() - t
        self._account(moved, dt)
        self.stats.write_seconds += dt
        self.stats.blocks_written += len(pairs) - len(bad)
        self.stats.bytes_written += moved
        self.stats.write_errors += len(bad)
        return bad

    def read(self, host: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> set[int]:
        """Read disk slots ``d`` into host blocks ``host[h]`` for each ``(d, h)`` and check their
        checksums; returns the host blocks that are not the bytes written (checksum mismatch,
        short read, I/O error, a slot never written): those must not be used. A slot read is
        invalid afterwards (its accounting frees it)."""
        bad: set[int] = set()
        if not pairs:
            return bad
        t = time.perf_counter()
        moved = 0
        for d, h in pairs:
            self._check(d)
            crc, self._crc[d] = self._crc[d], None
            buf = _byte_view(host[h])
            try:
                fd, off = self._where(d)
                n = self._pread(fd, buf, off)
            except OSError:
                bad.add(h)
                continue
            moved += max(n, 0)
            if crc is None or n != self.block_nbytes or zlib.crc32(buf) != crc:
                bad.add(h)
        dt = time.perf_counter() - t
        self._account(moved, dt)
        self.stats.read_seconds += dt
        self.stats.blocks_read += len(pairs) - len(bad)
        self.stats.bytes_read += moved
        self.stats.corrupt_blocks += len(bad)
        return bad

    def _account(self, moved: int, seconds: float) -> None:
        self.stats.seconds += seconds
        if moved > 0 and seconds > 0:
            self._timings.append((moved, seconds))

    def take_timings(self) -> list[tuple[int, float]]:
        """``(bytes, seconds)`` of every write or read batch since the last call."""
        out, self._timings = self._timings, []
        return out
