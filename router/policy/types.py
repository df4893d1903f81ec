"""Value types exchanged between the router, its placement policies and the simulator (pure)."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash


class InstanceRole(enum.Enum):
    """What an engine instance runs: prompts only, decodes only, or whole requests (colocated)."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


@dataclass(frozen=True)
class SLO:
    """Latency objectives of one request: time to first token and mean time per output token."""

    ttft_s: float = math.inf
    tpot_s: float = math.inf

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO bounds must be > 0, got ttft={self.ttft_s!r} tpot={self.tpot_s!r}")

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        """Both objectives met (``tpot_s`` of a one-token request is 0)."""
        return ttft_s <= self.ttft_s and tpot_s <= self.tpot_s


@dataclass(frozen=True)
class RequestInfo:
    """What placement needs to know about a request.

    ``block_hashes`` are the chained keys of the prompt's *full* blocks (block size of the
    instances); they are what cached-prefix lookups match. ``slo`` is the request's own SLO
    (``None``: best effort). ``max_output_tokens`` is a hint (0: unknown).

    Goodput-aware placement also reads: ``priority`` (lower value = more important; shed last),
    ``tenant`` (per-tenant quotas; "" = the anonymous tenant), ``predicted_output_tokens`` (0:
    let the policy's length predictor guess) and ``store_prefix_blocks`` (leading prompt blocks
    the cluster's KV store holds: reachable by any prefill instance at the price of a transfer).
    ``adapter``: the LoRA adapter the request names ("" = the base model); the router narrows the
    view to the workers serving it before the policy decides. ``store_prefix_disk_blocks`` /
    ``store_disk_block_s``: the part of the store's prefix on its SSD tier and one block's read
    time there (a fetch from the store pays those reads before the transfer).
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[BlockHash] = ()
    max_output_tokens: int = 0
    slo: SLO | None = None
    arrival_time: float = 0.0
    priority: int = 0
    tenant: str = ""
    predicted_output_tokens: int = 0
    store_prefix_blocks: int = 0
    adapter: str = ""
    # of ``store_prefix_blocks``, how many the store node holds only in its disk tier (a fetch
    # reads them from disk first, issue #15), and the seconds one block's read takes there (its
    # measured bandwidth; 0: unknown, no disk read priced)
    store_prefix_disk_blocks: int = 0
    store_disk_block_s: float = 0.0


@dataclass(frozen=True)
class Placement:
    """Where a request goes.

    ``instance_id`` prefills the prompt (a prefill or a mixed instance; a mixed instance also
    decodes it unless ``decode_instance_id`` says otherwise). ``decode_instance_id`` may be left
    ``None`` and chosen when the KV is ready (:meth:`PlacementPolicy.choose_decode`).
    ``fetch_from``/``fetch_blocks``: pull the first ``fetch_blocks`` prompt blocks from that
    instance's cache before prefilling (global cache-aware placement). ``reused_blocks`` is the
    prefix the policy expects to reuse (local or fetched); ``estimated_ttft_s`` its TTFT estimate.
    ``local_prefill``: conditional disaggregation, the decode instance ``instance_id`` (==
    ``decode_instance_id``) runs the prompt itself, no KV handoff. ``estimated_tpot_s`` and
    ``predicted_output_tokens``: the goodput policy's decode-side predictions (``None``/0: none).
    """

    instance_id: str
    decode_instance_id: str | None = None
    fetch_from: str | None = None
    fetch_blocks: int = 0
    reused_blocks: int = 0
    estimated_ttft_s: float | None = None
    local_prefill: bool = False
    estimated_tpot_s: float | None = None
    predicted_output_tokens: int = 0


class RejectReason(enum.Enum):
    NO_INSTANCE = "no_instance"  # no instance of a usable role
    SLO_UNATTAINABLE = "slo_unattainable"  # predicted latency misses the request's SLO
    OVERLOADED = "overloaded"  # load above a configured limit
    QUOTA_EXCEEDED = "quota_exceeded"  # the tenant has its maximum of requests in flight


@dataclass(frozen=True)
class Rejection:
    """Early rejection: the router answers RESOURCE_EXHAUSTED with ``retry_after_s``."""

    reason: RejectReason
    message: str
    retry_after_s: float | None = None


Decision = Placement | Rejection


@dataclass(frozen=True)
class Observation:
    """What the router measured for one finished request (fed back to the policy).

    ``tpot_s``: mean seconds per output token after the first (0 when one token was produced).
    ``max_output_tokens``: the request's cap (0: unknown); the length predictor learns from it.
    """

    request_id: str
    ttft_s: float
    tpot_s: float
    output_tokens: int
    num_prompt_tokens: int = 0
    max_output_tokens: int = 0
