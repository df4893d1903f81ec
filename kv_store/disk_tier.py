"""A store node's disk tier (Mooncake's SSD pool): blocks evicted from the DRAM arena, kept in
large append-only segment files (:mod:`kv_store.segment`) under a byte budget.

Contracts:

* :meth:`DiskTier.stage` takes a copy of an evicted block and returns at once; a background
  writer appends staged blocks to the active segment (one ``writev`` per batch; no fsync per
  block: a segment is fsynced when it is sealed and at :meth:`DiskTier.close`). A staged block
  is readable (from its copy) until written. Staging is refused (False) while the disk is full,
  after a write error, or when ``max_pending_blocks`` are already waiting: the caller then simply
  forgets the block, as it would without a disk tier.
* Budget: the files' bytes never exceed ``capacity_bytes``. Before a segment grows past it,
  whole segments are evicted, least recently used first (use = a block of it was written or
  read); the active segment is never evicted.
* Reads (:meth:`DiskTier.read_into`) verify the block's checksum every time. A mismatch, a short
  read (truncated file), a vanished file or any ``OSError`` is a miss (None), never bytes: the
  block (for a vanished file: every block of that segment) is dropped from the catalog and
  :attr:`DiskTier.on_dropped` is told, so the node unregisters it.
* Full disk: an ``ENOSPC``/``EDQUOT`` on write seals the active segment (its intact records
  stay readable; a partial record at its tail is ignored by scans), drops the blocks of the
  failed batch, sets :attr:`DiskTierStats.disk_full` and refuses staging for
  ``full_retry_s``; the next stage after that tries again (in a new segment). Other write
  errors do the same and are counted as ``write_errors``.
* Restart: :meth:`DiskTier.open` scans existing segments' record headers (no data is read; each
  block's checksum is verified at its first read) and returns the blocks found. Segments of
  another KV layout are refused (:class:`~kv_store.segment.ForeignSegmentError` naming the
  file), never served. New blocks go to a new segment.
* Bandwidth: :attr:`DiskTierStats.read_bytes_per_s` is the measured read bandwidth of disk
  reads (bytes / seconds over the last ``bandwidth_window`` reads; 0 before the first), the
  number a router's transfer-time model can use for blocks on this tier.

Thread-safety: internal lock. :attr:`on_dropped` is called without that lock held, from the
thread that noticed the loss (a reader or the writer); :meth:`stage` never calls it, so a caller
may hold its own lock around :meth:`stage` (lock order: caller's lock, then the tier's).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.block_hash import BlockHash
from kv_store.checksum import block_checksum
from kv_store.segment import (
    RECORD_HEADER_NBYTES,
    FileLayer,
    ForeignSegmentError,
    OsFileLayer,
    encode_record_header,
    encode_segment_header,
    read_segment_header,
    scan_records,
    segment_name,
    segment_seq,
)
from pdserve.tracing import log_event

log = logging.getLogger(__name__)
GIB = 1 << 30
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class DiskTierOpenError(RuntimeError):
    """The disk tier's directory cannot be created, listed or read at start-up."""


class DiskTierSizeError(ValueError):
    """The disk tier's budget cannot hold what it must (two block records at least)."""


@dataclass(frozen=True)
class DiskTierConfig:
    """Where the tier lives and how big it may grow.

    ``segment_bytes`` 0: ``min(256 MiB, capacity_bytes // 2)``, at least one block record; a
    given one must be at most half the budget (whole segments are evicted, never the one being
    written). The budget must hold two segments of one block record each at least
    (:class:`DiskTierSizeError` when the tier is created).
    """

    path: str
    capacity_bytes: int
    segment_bytes: int = 0
    max_pending_blocks: int = 64  # staged blocks waiting for the writer; more are not demoted
    full_retry_s: float = 10.0  # after a full disk / write error, refuse staging this long
    bandwidth_window: int = 64  # reads averaged for read_bytes_per_s
    read_threads: int = 4  # blocks of one promotion read in parallel (queue depth for the SSD)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("disk tier path must be non-empty")
        if self.capacity_bytes < 1:
            raise ValueError(f"disk tier capacity must be > 0 bytes, got {self.capacity_bytes}")
        if (
            self.segment_bytes < 0
            or min(self.max_pending_blocks, self.bandwidth_window, self.read_threads) < 1
        ):
            raise ValueError(
                "segment_bytes must be >= 0; max_pending_blocks, bandwidth_window, read_threads >= 1"
            )
        if self.segment_bytes > self.capacity_bytes // 2:
            raise ValueError(
                f"segment_bytes {self.segment_bytes} must be at most half the capacity "
                f"({self.capacity_bytes} bytes): whole segments are evicted, the active one never"
            )
        if not (self.full_retry_s >= 0 and math.isfinite(self.full_retry_s)):
            raise ValueError(f"full_retry_s must be a finite number >= 0, got {self.full_retry_s}")


@dataclass(frozen=True)
class DiskTierStats:
    """A disk tier's state and counters. ``read_bytes_per_s``: bytes / seconds of the individual
    block reads over the last ``bandwidth_window`` reads (per read, whatever the page cache made of
    it; promotions run ``read_threads`` reads at once, so their aggregate rate can differ).
    Decoded from ``KVStoreStats`` (a client's view), the fields the wire does not carry are 0."""

    capacity_bytes: int
    bytes_used: int  # bytes of segment files (headers and dropped records included)
    num_blocks: int  # blocks readable from the tier (written or staged)
    num_pending: int  # staged, not yet written
    num_segments: int
    demotions: int  # blocks written to disk
    demotions_dropped: int  # evicted blocks not demoted (disk full, write error, queue full)
    promotion_reads: int  # blocks read back (served) from the tier
    read_misses: int  # reads that found nothing usable (checksum, truncated, deleted, I/O error)
    checksum_failures: int
    missing_files: int  # segments found deleted underneath
    write_errors: int  # failed appends other than a full disk
    full_events: int  # appends that hit a full disk
    disk_full: bool  # demotion paused because the last append hit a full disk
    demotion_paused: bool  # staging refused now (full disk or write error; retried after full_retry_s)
    segment_evictions: int
    recovered_blocks: int  # blocks found in segments at start-up
    read_bytes: int
    read_seconds: float
    read_bytes_per_s: float  # measured over the last reads (0: none yet)

    @classmethod
    def empty(cls, capacity_bytes: int = 0) -> DiskTierStats:
        """A tier that has done nothing yet."""
        zero = {f.name: 0 for f in dataclasses.fields(cls)}
        return cls(**zero | {"capacity_bytes": capacity_bytes, "disk_full": False, "demotion_paused": False})


@dataclass
class _Loc:
    seq: int
    offset: int  # data offset in the file
    nbytes: int
    checksum: int


@dataclass
class _Segment:
    seq: int
    path: str
    size: int
    blocks: set[BlockHash] = field(default_factory=set)


@dataclass
class _Staged:
    checksum: int
    data: bytes


class DiskTier:
    """See the module docstring. Create with :meth:`open`."""

    def __init__(
        self,
        config: DiskTierConfig,
        block_nbytes: int,
        fingerprint: bytes,
        *,
        files: FileLayer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_nbytes < 1:
            raise ValueError("block_nbytes must be >= 1")
        self.config = config
        self.block_nbytes = block_nbytes
        self.files: FileLayer = files if files is not None else OsFileLayer()
        self._clock = clock
        self._header = encode_segment_header(fingerprint)
        self._fingerprint = fingerprint
        record = RECORD_HEADER_NBYTES + block_nbytes
        if config.capacity_bytes < 2 * (len(self._header) + record):
            raise DiskTierSizeError(
                f"disk tier capacity {config.capacity_bytes} bytes holds fewer than 2 KV blocks of "
                f"{block_nbytes} bytes; give it more space"
            )
        seg = config.segment_bytes or min(256 << 20, config.capacity_bytes // 2)
        self.segment_bytes = max(seg, len(self._header) + record)
        self.on_dropped: Callable[[Sequence[BlockHash]], None] = lambda _hs: None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._catalog: dict[BlockHash, _Loc] = {}
        self._segments: OrderedDict[int, _Segment] = OrderedDict()  # LRU: least recently used first
        self._pending: OrderedDict[BlockHash, _Staged] = OrderedDict()
        self._writing: dict[BlockHash, _Staged] = {}  # taken by the writer, not yet in the catalog
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._next_seq = 1
        self._full_until = -math.inf
        self._disk_full = False  # staging paused (full disk or write error)
        self._last_full = False  # the pause is for a full disk
        self._stop = False
        self._busy = False  # the writer holds a batch (until its losses are reported)
        self._thread: threading.Thread | None = None
        self._reads: collections.deque[tuple[int, float]] = collections.deque(maxlen=config.bandwidth_window)
        self._n = dict.fromkeys(
            (
                "demotions",
                "demotions_dropped",
                "promotion_reads",
                "read_misses",
                "checksum_failures",
                "missing_files",
                "write_errors",
                "full_events",
                "segment_evictions",
                "recovered_blocks",
                "read_bytes",
            ),
            0,
        )
        self._read_seconds = 0.0

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def open(
        cls,
        config: DiskTierConfig,
        block_nbytes: int,
        fingerprint: bytes,
        *,
        files: FileLayer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[DiskTier, list[tuple[BlockHash, int]]]:
        """Create the directory if needed, recover its segments, start the writer.

        Returns the tier and the recovered blocks as ``(key, checksum)`` (for the index).
        Raises ForeignSegmentError (a segment of another layout or not a segment) or
        DiskTierOpenError (the directory cannot be created or read)."""
        tier = cls(config, block_nbytes, fingerprint, files=files, clock=clock)
        try:
            os.makedirs(config.path, exist_ok=True)
            recovered = tier._recover()
        except OSError as e:
            raise DiskTierOpenError(f"disk tier {config.path}: cannot open it: {e}") from e
        tier._thread = threading.Thread(target=tier._writer, name="kv-disk-writer", daemon=True)
        tier._thread.start()
        return tier, recovered

    def _recover(self) -> list[tuple[BlockHash, int]]:
        names = sorted(
            (seq, name)
            for name in self.files.listdir(self.config.path)
            if (seq := segment_seq(name)) is not None
        )
        out: list[tuple[BlockHash, int]] = []
        for seq, name in names:
            path = os.path.join(self.config.path, name)
            head = self.files.read(path, 0, len(self._header))
            if len(head) < len(self._header) and self._header.startswith(head):
                # a segment whose creation was cut short (full disk, crash): it holds no record
                self.files.remove(path)
                self._next_seq = max(self._next_seq, seq + 1)
                continue
            try:
                fp, hlen = read_segment_header(self.files, path)
            except ForeignSegmentError as e:
                raise ForeignSegmentError(
                    f"disk tier {self.config.path}: {name}: {e}; move it away or use another directory"
                ) from None
            if fp != self._fingerprint:
                raise ForeignSegmentError(
                    f"disk tier {self.config.path}: {name} holds KV blocks of another layout "
                    f"({fp.decode(errors='replace')}, this node: {self._fingerprint.decode()}); "
                    "use another --disk-tier directory or delete its segments"
                )
            seg = _Segment(seq, path, self.files.size(path))
            for rec in scan_records(self.files, path, hlen):
                if rec.nbytes != self.block_nbytes:
                    break  # cannot be: same layout; treat as damage, stop trusting the file
                old = self._catalog.get(rec.block_hash)
                if old is not None:
                    self._segments[old.seq].blocks.discard(rec.block_hash)
                self._catalog[rec.block_hash] = _Loc(seq, rec.data_offset, rec.nbytes, rec.checksum)
                seg.blocks.add(rec.block_hash)
            self._segments[seq] = seg
            self._next_seq = max(self._next_seq, seq + 1)
        out = [(h, loc.checksum) for h, loc in self._catalog.items()]
        self._n["recovered_blocks"] = len(out)
        # over budget (a smaller --disk-tier-gib than before): evict oldest segments now
        dropped = self._evict_for(0)
        if dropped:
            gone = set(dropped)
            out = [x for x in out if x[0] not in gone]
        return out

    def close(self, drain_timeout_s: float = 10.0) -> None:
        """Write what is staged (up to ``drain_timeout_s``), fsync and close. Idempotent."""
        self.flush(drain_timeout_s)
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=drain_timeout_s)
        with self._lock:
            self._seal()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every staged block is written (or dropped, and the loss reported through
        :attr:`on_dropped`); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending or self._writing or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    # ------------------------------------------------------------------ queries
    def contains(self, h: BlockHash) -> bool:
        with self._lock:
            return h in self._catalog or h in self._pending or h in self._writing

    def checksum_of(self, h: BlockHash) -> int | None:
        with self._lock:
            s = self._pending.get(h) or self._writing.get(h)
            if s is not None:
                return s.checksum
            loc = self._catalog.get(h)
            return loc.checksum if loc is not None else None

    def hashes(self) -> list[BlockHash]:
        """Every block readable from the tier."""
        with self._lock:
            return [*self._catalog, *(h for h in self._writing if h not in self._catalog), *self._pending]

    def forget(self, hashes: Sequence[BlockHash]) -> int:
        """Drop blocks from the tier (e.g. deleted by a client); their bytes stay in the segment
        until it is evicted. Returns how many were held."""
        n = 0
        with self._lock:
            for h in hashes:
                hit = self._pending.pop(h, None) is not None
                hit |= self._writing.pop(h, None) is not None
                loc = self._catalog.pop(h, None)
                if loc is not None:
                    hit = True
                    seg = self._segments.get(loc.seq)
                    if seg is not None:
                        seg.blocks.discard(h)
                n += hit
        return n

    def forget_if_other(self, h: BlockHash, checksum: int) -> bool:
        """Forget ``h`` if the tier holds it with another checksum (the node stored other bytes
        under the key since); True if it did."""
        held = self.checksum_of(h)
        if held is None or held == checksum:
            return False
        return self.forget([h]) > 0

    def stats(self) -> DiskTierStats:
        with self._lock:
            nb = sum(b for b, _ in self._reads)
            ns = sum(s for _, s in self._reads)
            return DiskTierStats(
                capacity_bytes=self.config.capacity_bytes,
                bytes_used=sum(s.size for s in self._segments.values()),
                num_blocks=len(self._catalog.keys() | self._pending.keys() | self._writing.keys()),
                num_pending=len(self._pending) + len(self._writing),
                num_segments=len(self._segments),
                disk_full=self._disk_full and self._last_full,
                demotion_paused=self._disk_full,
                read_seconds=self._read_seconds,
                read_bytes_per_s=nb / ns if ns > 0 else 0.0,
                **self._n,
            )

    @property
    def accepting(self) -> bool:
        """Whether :meth:`stage` would take a block now (ignoring the queue bound)."""
        with self._lock:
            return self._accepting()

    def _accepting(self) -> bool:
        if self._disk_full and self._clock() >= self._full_until:
            self._disk_full = False  # try again (the writer opens a new segment)
        return not self._disk_full and not self._stop

    # ------------------------------------------------------------------ demotion
    def stage(self, h: BlockHash, checksum: int, data: bytes | memoryview) -> bool:
        """Queue a copy of an evicted block for writing; True if the tier holds it now (already
        there with the same checksum, or staged). Never blocks on I/O."""
        with self._lock:
            loc = self._catalog.get(h)
            if loc is not None and loc.checksum == checksum:
                self._touch(loc.seq)
                return True
            s = self._pending.get(h) or self._writing.get(h)
            if s is not None and s.checksum == checksum:
                return True
            if not self._accepting() or len(self._pending) >= self.config.max_pending_blocks:
                self._n["demotions_dropped"] += 1
                return False
            if memoryview(data).nbytes != self.block_nbytes:
                raise ValueError(
                    f"block has {memoryview(data).nbytes} bytes, the tier's are {self.block_nbytes}"
                )
            if loc is not None:  # other bytes under the key (it was deleted and put again)
                self._segments[loc.seq].blocks.discard(h)
                del self._catalog[h]
            self._pending[h] = _Staged(checksum, bytes(data))
            self._wake.notify_all()
            return True

    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stop:
                    self._wake.wait()
                if not self._pending:
                    return
                batch: list[tuple[BlockHash, _Staged]] = []
                while self._pending and len(batch) < 16:
                    h, s = self._pending.popitem(last=False)
                    self._writing[h] = s
                    batch.append((h, s))
                self._busy = True
            try:
                dropped = self._write_batch(batch)
                if dropped:
                    self.on_dropped(dropped)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _write_batch(self, batch: list[tuple[BlockHash, _Staged]]) -> list[BlockHash]:
        """Append ``batch`` to the active segment (rolling and evicting as needed); returns the
        blocks lost (write failed or segment evictions)."""
        lost: list[BlockHash] = []
        rec = RECORD_HEADER_NBYTES + self.block_nbytes
        i = 0
        while i < len(batch):
            with self._lock:
                if self._active is not None and self._active.size + rec > self.segment_bytes:
                    self._seal()
                if self._active is None:
                    lost += self._evict_for(len(self._header) + rec)
                    try:
                        self._open_segment()
                    except OSError as e:
                        lost += self._write_failed(batch[i:], e)
                        return lost
                assert self._active is not None and self._active_fd is not None
                changed = self._changed_underneath(self._active, self._active_fd)
                if changed is not None:
                    lost += changed
                    continue  # the next round opens a new segment
                room = max(1, (self.segment_bytes - self._active.size) // rec)
                lost += self._evict_for(min(room, len(batch) - i) * rec)
                part = batch[i : i + room]
                seg, fd = self._active, self._active_fd
                start = seg.size
            parts: list[bytes | memoryview] = []
            for h, s in part:
                parts += [encode_record_header(h, s.checksum, self.block_nbytes), s.data]
            try:
                self.files.write(fd, parts)
            except OSError as e:
                with self._lock:
                    lost += self._write_failed(batch[i:], e)
                return lost
            with self._lock:
                off = start
                alive = self._segments.get(seg.seq) is seg  # not dropped meanwhile (deleted underneath)
                for h, s in part:
                    if self._writing.pop(h, None) is s:  # not forgotten meanwhile
                        if alive:
                            self._catalog[h] = _Loc(
                                seg.seq, off + RECORD_HEADER_NBYTES, self.block_nbytes, s.checksum
                            )
                            seg.blocks.add(h)
                        else:
                            lost.append(h)
                    off += rec
                seg.size = off
                self._n["demotions"] += len(part)
                self._touch(seg.seq)
            i += len(part)
        return lost

    def _changed_underneath(self, seg: _Segment, fd: int) -> list[BlockHash] | None:
        """(lock held) None if the active segment is as this tier left it; else stop appending to
        it and return the blocks lost: all of its blocks if it was deleted; none if it was
        truncated or extended (its blocks stay; each read verifies its checksum and length)."""
        try:
            st = self.files.fstat(fd)
        except OSError:
            st = None
        if st is not None and st.st_nlink > 0 and st.st_size == seg.size:
            return None
        lost: list[BlockHash] = []
        if st is None or st.st_nlink == 0:
            self._n["missing_files"] += 1
            self._segments.pop(seg.seq, None)
            lost = self._drop_segment_blocks(seg)
        else:
            seg.size = st.st_size
        log_event(
            log,
            "kv disk tier segment changed underneath",
            logging.WARNING,
            path=seg.path,
            deleted=st is None or st.st_nlink == 0,
            blocks_lost=len(lost),
        )
        self._seal(sync=False)
        return lost

    def _write_failed(self, rest: list[tuple[BlockHash, _Staged]], e: OSError) -> list[BlockHash]:
        """(lock held) A write or segment creation failed: seal, drop ``rest``, refuse for a while."""
        full = e.errno in _FULL_ERRNOS
        self._n["full_events" if full else "write_errors"] += 1
        self._disk_full = True
        self._last_full = full
        self._full_until = self._clock() + self.config.full_retry_s
        if self._active is not None:
            # the tail may hold a partial record: never append after it; size = what is on disk
            with contextlib.suppress(OSError):
                self._active.size = self.files.size(self._active.path)
        self._seal(sync=False)
        lost = []
        for h, s in rest:
            if self._writing.pop(h, None) is s:
                lost.append(h)
        # whatever else is staged will not be written before the retry time: drop it too
        lost += list(self._pending)
        self._pending.clear()
        self._n["demotions_dropped"] += len(lost)
        log_event(
            log,
            "kv disk tier full" if full else "kv disk tier write failed",
            logging.WARNING,
            path=self.config.path,
            error=str(e),
            retry_in_s=self.config.full_retry_s,
            dropped_blocks=len(lost),
        )
        return lost

    def _open_segment(self) -> None:
        seq = self._next_seq
        self._next_seq += 1
        path = os.path.join(self.config.path, segment_name(seq))
        fd = self.files.open_append(path)
        seg = _Segment(seq, path, 0)
        self._segments[seq] = seg
        self._active, self._active_fd = seg, fd
        try:
            self.files.write(fd, [self._header])
        except OSError:
            # no record can be in it: remove it rather than leave a headless file behind
            self._segments.pop(seq, None)
            self._active, self._active_fd = None, None
            try:
                self.files.close(fd)
                self.files.remove(path)
            except OSError:
                pass
            raise
        seg.size = len(self._header)

    def _seal(self, sync: bool = True) -> None:
        """(lock held) Close the active segment (fsync first unless ``sync`` is False)."""
        fd, self._active_fd = self._active_fd, None
        self._active = None
        if fd is None:
            return
        try:
            if sync:
                self.files.fsync(fd)
        except OSError as e:
            log_event(log, "kv disk tier fsync failed", logging.WARNING, error=str(e))
        finally:
            with contextlib.suppress(OSError):
                self.files.close(fd)

    def _evict_for(self, nbytes: int) -> list[BlockHash]:
        """(lock held) Evict least recently used sealed segments until ``nbytes`` more fit."""
        lost: list[BlockHash] = []
        used = sum(s.size for s in self._segments.values())
        for seq in list(self._segments):
            if used + nbytes <= self.config.capacity_bytes:
                break
            if self._active is not None and seq == self._active.seq:
                continue
            seg = self._segments.pop(seq)
            used -= seg.size
            lost += self._drop_segment_blocks(seg)
            self._n["segment_evictions"] += 1
            try:
                self.files.remove(seg.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log_event(
                    log, "kv disk tier segment removal failed", logging.WARNING, path=seg.path, error=str(e)
                )
        return lost

    def _drop_segment_blocks(self, seg: _Segment) -> list[BlockHash]:
        lost = []
        for h in seg.blocks:
            loc = self._catalog.get(h)
            if loc is not None and loc.seq == seg.seq:
                del self._catalog[h]
                lost.append(h)
        seg.blocks.clear()
        return lost

    def _touch(self, seq: int) -> None:
        if seq in self._segments:
            self._segments.move_to_end(seq)

    # ------------------------------------------------------------------ promotion reads
    def read_into(self, h: BlockHash, dest: memoryview) -> int | None:
        """Copy block ``h`` into ``dest`` (``block_nbytes`` long) and return its checksum, or
        None on a miss (not held, or unusable: see the module docstring)."""
        if memoryview(dest).nbytes != self.block_nbytes:
            raise ValueError(
                f"destination has {memoryview(dest).nbytes} bytes, blocks have {self.block_nbytes}"
            )
        with self._lock:
            s = self._pending.get(h) or self._writing.get(h)
            if s is not None:
                dest[:] = s.data
                self._n["promotion_reads"] += 1
                return s.checksum
            loc = self._catalog.get(h)
            if loc is None:
                return None
            path = self._segments[loc.seq].path
            self._touch(loc.seq)
        t0 = time.perf_counter()
        lost: list[BlockHash] = []
        try:
            got = self.files.read_into(path, loc.offset, dest)
        except FileNotFoundError:
            with self._lock:
                self._n["read_misses"] += 1
                seg = self._segments.pop(loc.seq, None)
                if seg is not None:
                    self._n["missing_files"] += 1
                    lost = self._drop_segment_blocks(seg)
                    if self._active is seg:
                        self._seal(sync=False)
            log_event(log, "kv disk tier segment missing", logging.WARNING, path=path, blocks_lost=len(lost))
            self.on_dropped(lost)
            return None
        except OSError as e:
            with self._lock:
                self._n["read_misses"] += 1
            log_event(log, "kv disk tier read failed", logging.WARNING, path=path, error=str(e))
            return None
        dt = time.perf_counter() - t0
        ok = got == loc.nbytes and block_checksum(dest) == loc.checksum
        with self._lock:
            if ok:
                self._reads.append((got, dt))
                self._n["read_bytes"] += got
                self._read_seconds += dt
                self._n["promotion_reads"] += 1
            else:
                self._n["read_misses"] += 1
                reason = "truncated" if got != loc.nbytes else "checksum mismatch"
                self._n["checksum_failures"] += got == loc.nbytes
                if self._catalog.get(h) is loc:
                    del self._catalog[h]
                    seg = self._segments.get(loc.seq)
                    if seg is not None:
                        seg.blocks.discard(h)
                    lost = [h]
        if not ok:
            log_event(
                log,
                "kv disk tier block unusable",
                logging.WARNING,
                path=path,
                reason=reason,
                block=h.hex()[:12],
            )
            self.on_dropped(lost)
            return None
        return loc.checksum
