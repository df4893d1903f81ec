"""What reading a KV block from a store node's SSD tier costs, as the router prices it (issue #15).

A prefix the KV store holds partly on a node's disk tier is read from disk before it is sent
(the node promotes it to DRAM first), so a fetch from the store costs those reads too. Store nodes
measure their disk read bandwidth (``KVStoreStats.disk_read_bytes_per_s``, the
``pdserve_kv_disk_read_bytes_per_second`` gauge); :class:`DiskReadRates` keeps each node's
seconds per block from its Stats, refreshed at most every ``ttl_s`` and only for nodes the router
found disk-tier blocks on (a lookup without any costs nothing). Before a node has measured a read
(bandwidth 0), ``default_bytes_per_s`` stands in. Thread-safe; the Stats call is injected
(``fetch``), so the rules are tested with fakes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_DISK_READ_BYTES_PER_S = 1e9  # assumed until a node measured its own (one NVMe SSD, conservative)
RATES_TTL_S = 10.0


@dataclass(frozen=True)
class NodeDiskRate:
    """A node's measured disk read bandwidth (0: none measured yet) and its KV block size in bytes."""

    read_bytes_per_s: float
    block_nbytes: int


@dataclass(frozen=True)
class StorePrefix:
    """The prompt's prefix in the KV store as placement prices it: ``blocks`` leading blocks on
    one node, ``disk_blocks`` of them only in its disk tier, ``disk_block_s`` seconds to read one
    there (0: no disk read priced)."""

    blocks: int
    disk_blocks: int = 0
    disk_block_s: float = 0.0


class DiskReadRates:
    """Per store node (by address), seconds to read one KV block from its disk tier."""

    def __init__(
        self,
        fetch: Callable[[str], NodeDiskRate],
        ttl_s: float = RATES_TTL_S,
        default_bytes_per_s: float = DEFAULT_DISK_READ_BYTES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (default_bytes_per_s > 0 and math.isfinite(default_bytes_per_s)):
            raise ValueError(f"default_bytes_per_s must be > 0, got {default_bytes_per_s}")
        self._fetch = fetch
        self.ttl_s = ttl_s
        self.default_bytes_per_s = default_bytes_per_s
        self._clock = clock
        # address -> (when fetched or tried, rate; None: its Stats could not be read)
        self._rates: dict[str, tuple[float, NodeDiskRate | None]] = {}
        self._lock = threading.Lock()

    def block_read_s(self, address: str) -> float:
        """Seconds to read one block from the disk tier of the node at ``address`` (0 when its
        Stats cannot be read and none are cached: the read is not priced rather than guessed).
        A failed fetch keeps the last rate (if any) and is not retried before ``ttl_s``, so an
        unreachable node costs one Stats call per ``ttl_s``, not one per request."""
        now = self._clock()
        with self._lock:
            got = self._rates.get(address)
        if got is None or now - got[0] >= self.ttl_s:
            try:
                rate: NodeDiskRate | None = self._fetch(address)
            except Exception:  # noqa: BLE001 - pricing only sharpens an estimate
                rate = got[1] if got is not None else None
            got = (now, rate)
            with self._lock:
                self._rates[address] = got
        r = got[1]
        if r is None:
            return 0.0
        bw = r.read_bytes_per_s if r.read_bytes_per_s > 0 else self.default_bytes_per_s
        return r.block_nbytes / bw if r.block_nbytes > 0 else 0.0


def grpc_node_rate(client_for: Callable[[str], object]) -> Callable[[str], NodeDiskRate]:
    """A :data:`DiskReadRates` fetch over the store nodes' Stats (``client_for(address)``: a
    :class:`kv_store.client.KVStoreClient`)."""

    def fetch(address: str) -> NodeDiskRate:
        st = client_for(address).stats()  # type: ignore[attr-defined]
        bw = st.disk.read_bytes_per_s if st.disk is not None else 0.0
        return NodeDiskRate(float(bw), int(st.layout.block_nbytes))

    return fetch
