"""GPU specifications used by first-principles estimates and memory sizing.

Peak numbers are datasheet values for dense BF16/FP16 tensor-core math and HBM bandwidth of the
SXM parts (A100-80GB SXM: 312 TFLOP/s, 2.039 TB/s; H100-80GB SXM: 989 TFLOP/s, 3.35 TB/s).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GpuKind(enum.Enum):
    A100 = "a100"
    H100 = "h100"


@dataclass(frozen=True)
class GpuSpec:
    kind: GpuKind
    memory_bytes: int
    peak_flops: float  # dense fp16/bf16 FLOP/s
    mem_bandwidth: float  # HBM bytes/s
    vidur_network: str  # Vidur network profile directory for intra-node collectives


GPUS: dict[GpuKind, GpuSpec] = {
    GpuKind.A100: GpuSpec(GpuKind.A100, 80 * 2**30, 312e12, 2.039e12, "a100_dgx"),
    GpuKind.H100: GpuSpec(GpuKind.H100, 80 * 2**30, 989e12, 3.35e12, "h100_dgx"),
}


def gpu_spec(kind: GpuKind | str) -> GpuSpec:
    return GPUS[GpuKind(kind)]
