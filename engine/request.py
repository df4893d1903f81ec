"""Request state shared by the scheduler, the KV manager and the model runner (pure)."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_hash import BlockHash
from engine.sampling_params import SamplingParams

_seq = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # KV dropped: recomputed when it runs again
    SWAPPED = "swapped"  # KV in the host block pool: copied back when it runs again
    PREFILLED = "prefilled"  # prefill-only request done: first token sampled, KV held for export
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    PREFILLED = "prefilled"


@dataclass
class Request:
    """One generation request as the engine sees it.

    ``prompt_token_ids`` may be any sequence (the simulator passes a ``range``). The token at
    index ``i`` of ``prompt + output`` is at position ``i``. ``num_computed_tokens`` counts the
    leading tokens whose KV is in the cache (computed or reused). ``block_hashes`` holds the
    chained keys of the *full* blocks seen so far; a caller may pre-fill them (the simulator
    does, from trace hash ids) and the KV manager extends them as tokens arrive.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower value = more important
    eos_token_ids: tuple[int, ...] = ()
    adapter_id: str = ""
    cache_salt: str = ""
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: not yet scheduled)
    num_preemptions: int = 0
    num_swaps: int = 0  # preemptions that swapped the KV out (subset of num_preemptions)
    # skip-join MLFQ state (engine.mlfq; used only by SchedulingPolicy.MLFQ)
    mlfq_level: int = 0
    mlfq_iters: int = 0  # iterations run at mlfq_level
    last_served: float = 0.0  # scheduler clock when last scheduled (or added)
    # MLFQ swap backoff (engine.mlfq.swap_backoff_iters): the policy does not preempt the
    # request before this scheduler iteration (set when a swapped-out request runs again)
    mlfq_protected_until: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)
    seq_no: int = field(default_factory=lambda: next(_seq))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True when exactly the last sampled token is waiting to be fed back."""
        return self.num_output_tokens > 0 and self.num_pending_tokens == 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        out: list[int] = []
        if start < p:
            out.extend(self.prompt_token_ids[start : min(end, p)])
        if end > p:
            out.extend(self.output_token_ids[max(start - p, 0) : end - p])
        return out

    def all_token_ids(self) -> list[int]:
        return self.token_slice(0, self.num_tokens)

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival_time, self.seq_no)
