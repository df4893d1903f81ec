"""Per-request outcomes and their summaries (SLO attainment, percentiles, hit ratio, CSV)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from router.policy import SLO

NAN = math.nan


@dataclass(slots=True)
class RequestRecord:
    """Times are simulated seconds; NaN = did not happen (rejected or unfinished)."""

    request_id: str
    arrival: float
    input_len: int
    output_len: int
    prefill_instance: str = ""
    decode_instance: str = ""
    first_scheduled: float = NAN
    first_token: float = NAN
    finish: float = NAN
    cached_tokens: int = 0
    fetched_blocks: int = 0
    transfer_s: float = 0.0
    rejected: str = ""
    max_tbt: float = NAN  # largest gap between consecutive tokens (SimConfig.track_tbt)
    last_token: float = NAN
    adapter: str = ""  # the LoRA adapter the request named ("": the base model)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        if self.output_len <= 1:
            return 0.0 if self.finish == self.finish else NAN
        return (self.finish - self.first_token) / (self.output_len - 1)

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def queueing(self) -> float:
        return self.first_scheduled - self.arrival

    @property
    def finished(self) -> bool:
        return self.finish == self.finish  # not NaN

    def meets(self, slo: SLO) -> bool:
        if self.rejected or not self.finished:
            return False
        return slo.met(self.ttft, self.tpot)


@dataclass
class SimResult:
    records: list[RequestRecord]
    sim_time_s: float
    wall_time_s: float
    complete: bool  # False when stopped early (attainment target out of reach) or by the time limit
    instance_stats: dict[str, Any] = field(default_factory=dict)
    num_gpus: int = 0
    num_events: int = 0  # discrete events the loop ran
    migrations: list[Any] = field(default_factory=list)  # simulator.migration.MigrationRecord, in start order
    store: Any = None  # simulator.kv_store.SimKVStoreStats with ClusterConfig.kv_store, else None

    def __len__(self) -> int:
        return len(self.records)

    def attainment(self, slo: SLO) -> float:
        """Share of *all* requests (rejected and unfinished count as misses) meeting both SLOs."""
        if not self.records:
            return 1.0
        return sum(1 for r in self.records if r.meets(slo)) / len(self.records)

    def array(self, metric: str) -> np.ndarray:
        """Finished requests' ``ttft`` / ``tpot`` / ``e2e`` / ``queueing`` as an array."""
        return np.array([getattr(r, metric) for r in self.records if r.finished], dtype=float)

    @property
    def num_rejected(self) -> int:
        return sum(1 for r in self.records if r.rejected)

    @property
    def num_finished(self) -> int:
        return sum(1 for r in self.records if r.finished)

    def hit_ratio(self) -> float:
        """Prompt tokens served from a prefix cache (local or fetched) / prompt tokens, prefilled requests."""
        done = [r for r in self.records if r.first_token == r.first_token]
        tot = sum(r.input_len for r in done)
        return sum(r.cached_tokens for r in done) / tot if tot else 0.0

    def throughput(self) -> float:
        return self.num_finished / self.sim_time_s if self.sim_time_s > 0 else 0.0

    def summary(self, slo: SLO | None = None) -> dict[str, float]:
        out: dict[str, float] = {
            "requests": len(self.records),
            "finished": self.num_finished,
            "rejected": self.num_rejected,
            "sim_time_s": self.sim_time_s,
            "wall_time_s": self.wall_time_s,
            "throughput_rps": self.throughput(),
            "prefix_hit_ratio": self.hit_ratio(),
        }
        for m in ("ttft", "tpot", "e2e", "queueing", "max_tbt"):
            a = self.array(m)
            a = a[~np.isnan(a)]
            if m == "max_tbt" and not a.size:
                continue  # not tracked (SimConfig.track_tbt off)
            for name, v in (
                ("mean", a.mean() if a.size else NAN),
                ("p50", _pct(a, 50)),
                ("p90", _pct(a, 90)),
                ("p99", _pct(a, 99)),
            ):
                out[f"{m}_{name}"] = float(v)
        if slo is not None:
            out["slo_attainment"] = self.attainment(slo)
        return out

    def write_csv(self, path: str | Path) -> None:
        names = [f.name for f in fields(RequestRecord)]
        with Path(path).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*names, "ttft", "tpot", "e2e", "queueing"])
            for r in self.records:
                w.writerow([*(getattr(r, n) for n in names), r.ttft, r.tpot, r.e2e, r.queueing])


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else NAN


def format_summary(s: dict[str, float], keys: Sequence[str] | None = None) -> str:
    keys = keys or list(s)
    return "\n".join(f"{k:>18}: {s[k]:.4g}" if isinstance(s[k], float) else f"{k:>18}: {s[k]}" for k in keys)
