"""Latency models behind one interface (:class:`LatencyModel`).

* :class:`VidurLatencyModel`: Vidur operator tables + first-principles attention (Llama family, A100/H100).
* :class:`DistServeLatencyModel`: DistServe's fitted formulas (OPT-13B/66B, A100).
* :class:`ProfiledLatencyModel`: a profile measured on the real engine (``pdserve profile``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from simulator.latency.base import LatencyModel
from simulator.latency.distserve import DistServeEngine, DistServeLatencyModel
from simulator.latency.profiled import ProfiledLatencyModel
from simulator.latency.vidur import VidurLatencyModel
from simulator.models import model_spec


class LatencySource(enum.Enum):
    AUTO = "auto"
    VIDUR = "vidur"
    DISTSERVE = "distserve"
    PROFILE = "profile"


@dataclass(frozen=True)
class LatencySpec:
    """Which latency model to build for an instance (the TP degree is given per instance)."""

    model: str
    gpu: str = "a100"
    source: LatencySource = LatencySource.AUTO
    profile_path: str | None = None
    transfer_bandwidth: float = 25e9  # bytes/s between instances (200 Gb/s RDMA)
    transfer_latency_s: float = 5e-4
    distserve_engine: DistServeEngine = DistServeEngine.DISTSERVE  # which engine's fits (DISTSERVE source)

    def resolved_source(self) -> LatencySource:
        if self.source is not LatencySource.AUTO:
            return self.source
        if self.profile_path:
            return LatencySource.PROFILE
        m = model_spec(self.model)
        return LatencySource.VIDUR if m.vidur_id else LatencySource.DISTSERVE


_CACHE: dict[tuple[LatencySpec, int], LatencyModel] = {}


def make_latency_model(spec: LatencySpec, tp: int = 1) -> LatencyModel:
    """Build (and memoise: tables are read once per process) the model for ``spec`` at ``tp``."""
    key = (spec, tp)
    m = _CACHE.get(key)
    if m is not None:
        return m
    kw = {"transfer_bandwidth": spec.transfer_bandwidth, "transfer_latency_s": spec.transfer_latency_s}
    src = spec.resolved_source()
    if src is LatencySource.VIDUR:
        m = VidurLatencyModel(spec.model, spec.gpu, tp, **kw)
    elif src is LatencySource.DISTSERVE:
        m = DistServeLatencyModel(spec.model, tp, engine=spec.distserve_engine, **kw)
    else:
        if not spec.profile_path or not Path(spec.profile_path).exists():
            raise ValueError(f"profile file {spec.profile_path!r} not found (run `pdserve profile`)")
        m = ProfiledLatencyModel(spec.profile_path, **kw)
    _CACHE[key] = m
    return m


__all__ = [
    "DistServeEngine",
    "DistServeLatencyModel",
    "LatencyModel",
    "LatencySource",
    "LatencySpec",
    "ProfiledLatencyModel",
    "VidurLatencyModel",
    "make_latency_model",
]
