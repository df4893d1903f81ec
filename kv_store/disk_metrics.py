"""Prometheus metrics of a store node's disk tier (read at scrape time from ``BlockStore.stats()``).

Families (label ``node_id``; all absent on a node without a disk tier):

* ``pdserve_kv_tier_hits_total{source}``: block reads served from the DRAM arena (``dram``: the
  node's read hits) and blocks read back from the disk tier for a read (``disk``: promotions);
* ``pdserve_kv_disk_promotions_total``: blocks promoted disk -> DRAM (reads and lookups' prefetch);
* ``pdserve_kv_disk_demotions_total{result}``: evicted blocks ``written`` to disk, or ``dropped``
  (disk full, write error, writer queue full: forgotten as without a disk tier);
* ``pdserve_kv_disk_used_bytes`` (segment files) and ``pdserve_kv_disk_capacity_bytes`` (the
  budget, ``--disk-tier-gib``);
* ``pdserve_kv_disk_blocks``: blocks readable from the disk tier;
* ``pdserve_kv_disk_full``: 1 while demotion is paused because the disk is full (alert
  ``PdserveKVStoreDiskFull``), else 0;
* ``pdserve_kv_disk_errors_total{reason}``: ``checksum`` (a block failed its checksum: a miss),
  ``read_miss`` (any unusable read: checksum, truncated file, I/O error), ``missing_file`` (a
  segment deleted underneath), ``write_error``, ``full`` (appends that hit a full disk);
* ``pdserve_kv_disk_segment_evictions_total``: segments evicted (LRU) to stay within the budget;
* ``pdserve_kv_disk_read_bytes_per_second``: measured disk read bandwidth (0 before any read).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kv_store.store import StoreStats


class DiskTierCollector(Collector):
    """Scrape-time disk-tier families of one node (see the module docstring)."""

    def __init__(self, node_id: str, stats: Callable[[], StoreStats]) -> None:
        self.node_id = node_id
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        s = self._stats()
        d = s.disk
        if d is None:
            return []
        nid = [self.node_id]
        lab = ["node_id"]
        out: list[Metric] = []

        def fam(
            kind: type, name: str, doc: str, labels: list[str], values: list[tuple[list[str], float]]
        ) -> None:
            m = kind(name, doc, labels=labels)
            for extra, v in values:
                m.add_metric([*nid, *extra], v)
            out.append(m)

        fam(
            CounterMetricFamily,
            "pdserve_kv_tier_hits",
            "Block reads served by tier (source): dram (arena hits) or disk (blocks read back from the disk tier).",
            [*lab, "source"],
            [(["dram"], s.node.hits), (["disk"], s.promotions)],
        )
        fam(
            CounterMetricFamily,
            "pdserve_kv_disk_promotions",
            "Blocks promoted from disk to DRAM.",
            lab,
            [([], s.promotions)],
        )
        fam(
            CounterMetricFamily,
            "pdserve_kv_disk_demotions",
            "Blocks evicted from DRAM: written to the disk tier, or dropped (disk full, write error, queue full).",
            [*lab, "result"],
            [(["written"], d.demotions), (["dropped"], d.demotions_dropped)],
        )
        fam(
            GaugeMetricFamily,
            "pdserve_kv_disk_used_bytes",
            "Bytes of the disk tier's segment files.",
            lab,
            [([], d.bytes_used)],
        )
        fam(
            GaugeMetricFamily,
            "pdserve_kv_disk_capacity_bytes",
            "Byte budget of the disk tier (--disk-tier-gib).",
            lab,
            [([], d.capacity_bytes)],
        )
        fam(
            GaugeMetricFamily,
            "pdserve_kv_disk_blocks",
            "Blocks readable from the disk tier.",
            lab,
            [([], d.num_blocks)],
        )
        fam(
            GaugeMetricFamily,
            "pdserve_kv_disk_full",
            "1 while demotion to disk is paused because the disk is full (the node serves from DRAM).",
            lab,
            [([], 1.0 if d.disk_full else 0.0)],
        )
        fam(
            CounterMetricFamily,
            "pdserve_kv_disk_errors",
            "Disk tier errors by reason: checksum, read_miss, missing_file, write_error, full.",
            [*lab, "reason"],
            [
                (["checksum"], d.checksum_failures),
                (["read_miss"], d.read_misses),
                (["missing_file"], d.missing_files),
                (["write_error"], d.write_errors),
                (["full"], d.full_events),
            ],
        )
        fam(
            CounterMetricFamily,
            "pdserve_kv_disk_segment_evictions",
            "Disk tier segments evicted (least recently used) to stay within the budget.",
            lab,
            [([], d.segment_evictions)],
        )
        fam(
            GaugeMetricFamily,
            "pdserve_kv_disk_read_bytes_per_second",
            "Measured disk tier read bandwidth over recent reads (0 before any).",
            lab,
            [([], d.read_bytes_per_s)],
        )
        return out


def register_disk_metrics(
    registry: CollectorRegistry, node_id: str, stats: Callable[[], StoreStats]
) -> DiskTierCollector:
    """Register the disk-tier families of one node on ``registry``."""
    c = DiskTierCollector(node_id, stats)
    registry.register(c)
    return c
