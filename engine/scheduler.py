"""Iteration-level scheduler (Orca) with a per-step token budget and chunked prefill (Sarathi).

Pure policy: no torch, no I/O, no clock of its own. Each call to :meth:`Scheduler.schedule`
decides which requests run in the next model step and how many tokens each computes:

1. Running requests that are decoding (exactly one pending token) go first, in priority order,
   one token each. When the KV pool cannot supply a slot, the least important running request
   is preempted (its blocks are freed; it will recompute), so a decode never stalls behind a
   prompt. With a ``drafter`` (speculative decoding) a decode also computes its drafts, when
   budget and free blocks allow (drafts never preempt anyone); :meth:`Scheduler.update_from_output`
   keeps the verified run and rolls back the rest.
2. Running requests that are part-way through their prefill get the next chunk.
3. Waiting requests are admitted in priority order (lowest ``priority`` value, then arrival),
   after their cached prefix is reused, while budget, ``max_num_seqs`` and blocks allow.

Preemption (the victim is the least important running request) recomputes, or, with a host block
pool (``KVCacheManager(num_host_blocks=...)``) and measured rates (:meth:`Scheduler.set_swap_rates`),
swaps the victim's KV out when that is cheaper (:func:`engine.swap_policy.choose_preemption_mode`).
Swapped requests come back before new ones are admitted (their KV is copied back the step they
run again); the step's swap traffic is charged to its token budget
(:func:`engine.swap_policy.swap_budget_tokens`). ``SchedulerOutput.swap_out`` / ``swap_in`` are
the block copies the model runner does before the forward pass: every swap-out first, then every
swap-in (the scheduler plans all swap-outs of a step before its swap-ins, so a block released by
one is only reused after its copy).

Disk tier (``KVCacheManager(num_disk_blocks=...)``, cold KV on disk): when a preemption would
swap but the host pool is short, the host blocks of the coldest swapped-out requests (last in
queue order, not swapped out in this step) spill to disk to make room, when the cost model says
the swap plus the spill's disk write and read still beats recomputing
(:func:`engine.swap_policy.plan_spill`, ``choose_preemption_mode(spill_blocks=...)``); a disk
too full to take them means recompute (``num_disk_full``). A swapped-out request whose blocks are
on disk is promoted back to the host (``SchedulerOutput.disk_in``) before it can be swapped in
(until then the queue skips it: swapping in the requests behind it frees host slots for it):
at the end of each step the swapped queue's head is promoted (spilling colder host-resident
requests when the host pool is short, so the head never waits forever), and the next swapped
requests in queue order are promoted ahead of their turn while host slots and the step's budget
allow (prefetch). ``SchedulerOutput.disk_out`` (host -> disk) is executed before the step's
swap-outs, ``disk_in`` (disk -> host) after its swap-ins. The engine reports a failed disk write
or a corrupt read with :meth:`Scheduler.drop_swapped`: the request falls back to recompute.

Swap-in prefetch (``SchedulerConfig.swap_prefetch``): after admission, the next swapped-out
requests in queue order that did not get a seat this step are swapped in ahead of their turn
when the batch has a seat for them next step (a running request samples its last token now)
and the pool keeps one free block per running request (``SchedulerOutput.prefetch_in``: copied after the step's forward pass, on CUDA on
the side stream while the host plans the next step; the next forward waits for them). A
prefetched request holds its device blocks but does not run (:attr:`Scheduler.prefetched`); it
is admitted first at the next step without a copy. When running requests need blocks, prefetched
ones give theirs back first (swapped out again, or recomputed when the host cannot take them),
before any running request is preempted.

``SchedulingPolicy.MLFQ`` is FastServe's skip-join multi-level feedback queue
(:mod:`engine.mlfq`): order by level, demotion after each level's quantum of iterations, a
queued request of a higher level preempts a running one of a lower level when the batch is full
or the pool would pass ``mlfq_swap_watermark``, only where the victim's KV survives (swapped out,
or kept in the prefix cache: the policy never discards computed KV) and not while the victim
backs off after being swapped out and back (``mlfq_swap_backoff_iters``, doubling with each swap),
and a request queued past ``mlfq_starvation_s`` rises ``mlfq_promote_levels`` levels (aging; its
wait restarts). It needs the scheduler's ``clock``.

Chunks are bounded by ``long_prefill_token_threshold`` (Sarathi's chunk: 512 for strict SLOs,
2048 relaxed) and the remaining budget. :meth:`update_from_output` applies the sampled tokens,
checks token-level stop conditions and retires finished requests. The same class drives the
real engine and the simulator.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from engine import mlfq
from engine.block_manager import KVCacheManager
from engine.kv_fit import PoolShape
from engine.request import FinishReason, Request, RequestStatus
from engine.swap_policy import (
    PreemptionMode,
    SwapRates,
    choose_preemption_mode,
    disk_budget_tokens,
    plan_spill,
    swap_budget_tokens,
)
from pdserve.errors import InvalidRequestError, RequestNotFoundError

_SORT_KEY = attrgetter("priority", "arrival_time", "seq_no")
_MLFQ_KEY = attrgetter("mlfq_level", "arrival_time", "seq_no")


def _remove_identical(reqs: list[Request], req: Request) -> bool:
    """Remove ``req`` itself from ``reqs`` (by identity, not the dataclass's field-wise ``==``)."""
    for i, r in enumerate(reqs):
        if r is req:
            del reqs[i]
            return True
    return False


class SchedulingPolicy(enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"
    MLFQ = "mlfq"  # FastServe skip-join multi-level feedback queue (engine.mlfq)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget per step
    max_num_seqs: int = 64  # running requests at most
    long_prefill_token_threshold: int = 512  # chunk size (0 = only the budget bounds a chunk)
    enable_chunked_prefill: bool = True
    policy: SchedulingPolicy = SchedulingPolicy.PRIORITY
    max_model_len: int = 8192
    # skip-join MLFQ (policy=MLFQ only; see engine.mlfq)
    mlfq_num_levels: int = 4
    mlfq_quantum_iters: int = 8  # level i: mlfq_quantum_iters * 2**i iterations, then demotion
    mlfq_base_prefill_s: float = 0.05  # level i admits predicted prefill <= this * 2**i (skip-join)
    mlfq_starvation_s: float = 10.0  # queued this long without service: promoted (aging)
    # levels a starving request rises per starvation period (engine.mlfq.promote; >= the level
    # count: straight back to level 0)
    mlfq_promote_levels: int = 1
    # preempt lower levels before the pool passes this fraction (1.0: only when the queued
    # request does not fit; a lower mark swaps out KV that nobody takes: bench/mlfq_jct.py)
    mlfq_swap_watermark: float = 1.0
    # a request swapped out and back in is safe from MLFQ preemption for this many iterations,
    # doubling with each of its swaps up to the max (engine.mlfq.swap_backoff_iters; 0: off)
    mlfq_swap_backoff_iters: int = 256
    mlfq_swap_backoff_max_iters: int = 512
    # a queued request preempts a lower level only after waiting this many iterations (measured
    # iteration time; engine.mlfq.waited_enough): a seat or blocks that free up sooner come
    # without a preemption (0: preempt at once, as FastServe)
    mlfq_preempt_wait_iters: int = 8
    # swap-in prefetch: bring the next swapped-out requests in queue order back to the device one
    # step before they run, while seats, free blocks (beyond one per running request) and the
    # step's budget allow (SchedulerOutput.prefetch_in; see Scheduler._prefetch)
    swap_prefetch: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.mlfq_num_levels < 1 or self.mlfq_quantum_iters < 1:
            raise ValueError("mlfq_num_levels and mlfq_quantum_iters must be >= 1")
        if self.mlfq_promote_levels < 1:
            raise ValueError(f"mlfq_promote_levels must be >= 1, got {self.mlfq_promote_levels}")
        if not (self.mlfq_base_prefill_s > 0 and math.isfinite(self.mlfq_base_prefill_s)):
            raise ValueError(f"mlfq_base_prefill_s must be > 0, got {self.mlfq_base_prefill_s}")
        if not self.mlfq_starvation_s > 0:
            raise ValueError(f"mlfq_starvation_s must be > 0, got {self.mlfq_starvation_s}")
        if self.mlfq_swap_backoff_iters < 0 or self.mlfq_swap_backoff_max_iters < 0:
            raise ValueError(
                "mlfq_swap_backoff_iters and mlfq_swap_backoff_max_iters must be >= 0, got "
                f"{self.mlfq_swap_backoff_iters} and {self.mlfq_swap_backoff_max_iters}"
            )
        if self.mlfq_preempt_wait_iters < 0:
            raise ValueError(f"mlfq_preempt_wait_iters must be >= 0, got {self.mlfq_preempt_wait_iters}")
        if not 0 < self.mlfq_swap_watermark <= 1:
            raise ValueError(f"mlfq_swap_watermark must be in (0, 1], got {self.mlfq_swap_watermark}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(init=False, slots=True)
class ScheduledRequest:
    """``num_new_tokens`` tokens of ``request`` from position ``start``. A speculative decode
    (``spec_token_ids`` non-empty, :mod:`engine.spec_decode`) computes its pending token followed
    by those drafts (``num_new_tokens == 1 + len(spec_token_ids)``); the model runner scores every
    one of its positions and the engine keeps the drafts the target model agrees with."""

    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before this step
    samples: bool  # reaches the end of the request's tokens, so a token is sampled (derived)
    spec_token_ids: tuple[int, ...]  # drafted tokens scheduled after the pending one

    def __init__(
        self, request: Request, num_new_tokens: int, start: int, spec_token_ids: tuple[int, ...] = ()
    ) -> None:
        self.request = request
        self.num_new_tokens = num_new_tokens
        self.start = start
        self.spec_token_ids = spec_token_ids
        self.samples = start + num_new_tokens - len(spec_token_ids) == len(request.prompt_token_ids) + len(
            request.output_token_ids
        )


@dataclass
class SchedulerOutput:
    """One step's plan. ``preempted``: every request preempted this step (recomputed or swapped);
    ``swapped_out`` / ``swapped_in``: request ids; ``swap_out``: ``(device, host)`` and
    ``swap_in``: ``(host, device)`` block pairs to copy before the forward pass, swap-outs first;
    ``swap_budget_tokens``: token budget the copies displaced; ``copy_blocks``: copy-on-write
    ``(source, destination)`` device block pairs (a forked choice's first write into a shared
    partial block), copied after the swap-outs and before the swap-ins and the forward pass.

    Disk tier: ``disk_out``: ``(host, disk)`` block pairs to write to disk before the swap-outs
    (``spilled``: their request ids); ``disk_in``: ``(disk, host)`` pairs to read back after the
    swap-ins (``promoted``: their request ids, in the order their pairs appear).

    Swap-in prefetch: ``prefetch_in``: ``(host, device)`` pairs of requests swapped in ahead of
    their turn (``prefetched``: their ids), copied after the step's forward pass and before its
    ``disk_in`` reads (which may reuse those host slots); the next step's forward waits for them."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    swapped_out: list[str] = field(default_factory=list)
    swapped_in: list[str] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    swap_budget_tokens: int = 0
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    disk_out: list[tuple[int, int]] = field(default_factory=list)
    disk_in: list[tuple[int, int]] = field(default_factory=list)
    spilled: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    prefetch_in: list[tuple[int, int]] = field(default_factory=list)
    prefetched: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.request.is_decoding)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_batched_tokens - self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        *,
        clock: Callable[[], float] | None = None,
        block_nbytes: int = 1,
        prefill_time: Callable[[int], float] | None = None,
        drafter: Callable[[Request, int], Sequence[int]] | None = None,
    ) -> None:
        """``clock``: the time MLFQ's starvation bound is measured in (required for MLFQ);
        ``block_nbytes``: bytes of one KV block (swap cost); ``prefill_time(n)``: predicted
        prefill seconds of an ``n``-token prompt for MLFQ's skip-join (default: ``n`` over the
        measured prefill rate of :meth:`set_swap_rates`; top level while no rate is known).

        ``drafter(req, at_most)``: speculative decoding (:mod:`engine.spec_decode`): up to
        ``at_most`` drafted tokens continuing a decoding request; a decode with drafts is
        scheduled for ``1 + len(drafts)`` tokens (budget and KV blocks included) and
        :meth:`update_from_output` takes the verified run (the kept drafts plus the target's
        next token), rolling back what was rejected. None: no speculation."""
        if config.policy is SchedulingPolicy.MLFQ and clock is None:
            raise ValueError("SchedulingPolicy.MLFQ needs a clock (Scheduler(..., clock=...))")
        if block_nbytes < 1:
            raise ValueError(f"block_nbytes must be >= 1, got {block_nbytes}")
        self.config = config
        self.kv = kv
        self.clock = clock
        self.block_nbytes = block_nbytes
        self.prefill_time = prefill_time
        self.drafter = drafter
        self.rates: SwapRates | None = None
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        # swap-in prefetch: swapped-out requests whose KV is back on device ahead of their turn
        # (status SWAPPED, not running; admitted first, without a copy)
        self.prefetched: list[Request] = []
        self.num_prefetches = 0  # requests swapped in ahead of their turn (counted in num_swap_ins)
        self.num_prefetch_evictions = 0  # prefetched requests that gave their blocks back
        self.requests: dict[str, Request] = {}
        # live migration (engine.migration): running requests taken out of the batch, KV held
        self.paused: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that swapped (requests)
        self.num_swap_ins = 0
        self.num_promotions = 0  # MLFQ anti-starvation promotions
        self.iteration = 0  # schedule() calls so far (MLFQ swap backoff counts in these)
        self.num_backoff_holds = 0  # MLFQ preemptions not made because the victim was backing off
        # disk tier (kv.disk): requests spilled / promoted, swaps refused for a full disk, requests
        # dropped to recompute after a disk fault (drop_swapped); disk_enabled: the engine turns
        # spilling off after a write error
        self.num_spills = 0
        self.num_disk_promotions = 0
        self.num_disk_full = 0
        self.num_disk_fallbacks = 0
        self.disk_enabled = True
        self._step_swapped_out: set[str] = set()  # swapped out in this step: not spillable yet
        # MLFQ: the iteration time on the scheduler's clock (mean interval between schedule()
        # calls with something running) and the previous call's time, for the preemption wait
        self.iteration_s: float | None = None
        self._prev_now: float | None = None
        # MLFQ preemptions not made (yet) because the queued one had not waited enough
        self.num_wait_holds = 0

    def set_swap_rates(self, rates: SwapRates | None) -> None:
        """The measured copy bandwidth and prefill rate the swap-or-recompute choice uses."""
        self.rates = rates

    # ----------------------------------------------------------------- intake
    def add_request(self, req: Request) -> None:
        self.check_admissible(req)
        req.status = RequestStatus.WAITING
        self._join(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check_admissible(self, req: Request) -> None:
        """InvalidRequestError when :meth:`add_request` would refuse ``req``: its id is in use,
        its prompt exceeds the context, or it could not run to its end in the KV pool
        (:meth:`check_fits`). Nothing is added."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        if req.num_tokens > self.config.max_model_len:
            raise InvalidRequestError(
                f"prompt has {req.num_tokens} tokens, the model's context is {self.config.max_model_len}"
            )
        self.check_fits(req)

    def check_fits(self, req: Request) -> None:
        """InvalidRequestError when ``req`` could not run to its end even alone in the KV pool:
        its prompt does not fit, or its prompt plus ``max_tokens`` would outgrow the pool (it
        would run out, preempt itself and never finish). Every way a request enters this engine
        checks it: :meth:`add_request`, and a decode engine's adoption of a prefilled request
        (``LLMEngine.import_kv``)."""
        shape = self.pool_shape()
        if not shape.prompt_fits(req.num_tokens):
            raise InvalidRequestError(
                f"prompt of {req.num_tokens} tokens needs more KV blocks than this engine has "
                f"({self.kv.num_blocks} x {self.kv.block_size} tokens)"
            )
        peak = self._peak_blocks(req, shape)
        if peak > self.kv.num_blocks:
            # alone in the pool it would still run out and preempt itself forever: refuse it now
            raise InvalidRequestError(
                f"prompt of {req.num_tokens} tokens plus max_tokens {req.sampling_params.max_tokens} needs "
                f"{peak} KV blocks, more than this engine has ({self.kv.num_blocks} x {self.kv.block_size} "
                "tokens): lower max_tokens"
            )

    def pool_shape(self) -> PoolShape:
        """What bounds one request in this engine's KV pool (:mod:`engine.kv_fit`; the workers
        report it so the router refuses first what no pool could hold)."""
        return PoolShape(
            self.kv.num_blocks, self.kv.block_size, self.config.max_model_len, self.kv.sliding_window
        )

    def _peak_blocks(self, req: Request, shape: PoolShape | None = None) -> int:
        """The most KV blocks ``req`` can hold at once (:meth:`engine.kv_fit.PoolShape.peak_blocks`;
        ``shape``: this engine's, when the caller has it)."""
        return (shape or self.pool_shape()).peak_blocks(
            req.num_prompt_tokens,
            req.sampling_params.max_tokens,
            prefill_only=req.prefill_only,
            num_tokens=req.num_tokens,
        )

    def _join(self, req: Request) -> None:
        """Skip-join: the request's first MLFQ level, from its prompt's predicted prefill time."""
        if self.config.policy is not SchedulingPolicy.MLFQ:
            return
        assert self.clock is not None
        n = req.num_prompt_tokens
        if self.prefill_time is not None:
            pred = self.prefill_time(n)
        elif self.rates is not None:
            pred = self.rates.recompute_seconds(n)
        else:
            pred = 0.0
        c = self.config
        req.mlfq_level = mlfq.skip_join_level(pred, c.mlfq_base_prefill_s, c.mlfq_num_levels)
        req.mlfq_iters = 0
        req.last_served = self.clock()

    def add_running(self, req: Request) -> None:
        """Adopt a request whose KV is already in place (decode role / migration)."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.RUNNING
        self._join(req)
        self.requests[req.request_id] = req
        self.running.append(req)

    def pause_request(self, request_id: str) -> Request:
        """Take a running request out of the batch, keeping its blocks and state (live
        migration's stop-and-copy): it is not scheduled (nor preempted) until
        :meth:`resume_request`; abort/finish still retire it. Raises RequestNotFoundError for an
        unknown id, InvalidRequestError when it is not running."""
        req = self.requests.get(request_id)
        if req is None:
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        if req.status is not RequestStatus.RUNNING or not _remove_identical(self.running, req):
            raise InvalidRequestError(
                f"request {request_id!r} is {req.status.value}, not running: only a running request can be paused"
            )
        self.paused[request_id] = req
        return req

    def resume_request(self, request_id: str) -> None:
        """Put a paused request back into the batch (a migration that did not happen)."""
        req = self.paused.pop(request_id, None)
        if req is None:
            raise RequestNotFoundError(f"no paused request with id {request_id!r}")
        self.running.append(req)

    def abort_request(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        self._finish(req, FinishReason.ABORT)
        return req

    def finish_request(
        self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None
    ) -> None:
        """Retire a request for a reason decided outside (e.g. a stop string matched)."""
        req = self.requests.get(request_id)
        if req is not None:
            req.stop_reason = stop_reason
            self._finish(req, reason)

    def release_prefilled(self, request_id: str) -> None:
        """Free the blocks a prefill-only request held for export."""
        req = self.requests.pop(request_id, None)
        self.kv.free(request_id)
        if req is not None and req.status == RequestStatus.PREFILLED:
            req.status = RequestStatus.FINISHED_STOPPED

    # ----------------------------------------------------------------- queries
    @property
    def num_waiting(self) -> int:
        """Queued requests, swapped-out (and prefetched) ones included."""
        return len(self.waiting) + len(self.swapped) + len(self.prefetched)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.prefetched)

    # ----------------------------------------------------------------- schedule
    def _order(self, reqs: list[Request]) -> list[Request]:
        if self.config.policy is SchedulingPolicy.PRIORITY:
            return sorted(reqs, key=_SORT_KEY)  # == Request.sort_key, without a Python call each
        if self.config.policy is SchedulingPolicy.MLFQ:
            return sorted(reqs, key=_MLFQ_KEY)
        return sorted(reqs, key=lambda r: (r.arrival_time, r.seq_no))

    def _chunk(self, pending: int, budget: int) -> int:
        n = min(pending, budget)
        t = self.config.long_prefill_token_threshold
        if t > 0:
            n = min(n, t)
        if not self.config.enable_chunked_prefill and n < pending:
            return 0
        return n

    def _preempt_victim(self, exclude: set[str]) -> Request | None:
        cands = [r for r in self.running if r.request_id not in exclude]
        if not cands:
            return None
        return max(cands, key=_MLFQ_KEY if self.config.policy is SchedulingPolicy.MLFQ else _SORT_KEY)

    def _recompute_tokens(self, req: Request, for_memory: bool) -> int:
        """Tokens whose KV a drop of ``req`` makes a re-admission compute again.

        A preemption for memory hands the freed blocks to others at once: every computed token.
        A preemption that only frees a batch slot (MLFQ, the pool below its watermark) frees
        blocks nobody takes now: with prefix caching their full blocks stay registered on device
        (the most recently freed, so the LRU evicts them last) and the re-admission reuses them
        (``find_cached_prefix``), recomputing only the tokens past the last full block."""
        n = req.num_computed_tokens
        kv = self.kv
        if for_memory or not kv.enable_prefix_caching or kv.sliding_window is not None:
            return n
        if kv.num_free_blocks < kv.num_swap_out_blocks(req.request_id):
            # the pool could not hold the victim's freed blocks a second time: the allocations
            # before its re-admission would evict them from the prefix cache (memory binds), so the drop
            # loses them as surely as a preemption for memory does
            return n
        bs = kv.block_size
        return n - min(n // bs, (req.num_tokens - 1) // bs) * bs

    def _preemption_mode(self, req: Request, for_memory: bool) -> PreemptionMode:
        """How :meth:`_preempt` would take ``req`` out: SWAP when a host pool can take its KV (if
        need be after spilling colder swapped-out KV to the disk tier) and that is cheaper than
        recomputing (``choose_preemption_mode``, the recompute counted by
        :meth:`_recompute_tokens`), else RECOMPUTE."""
        return self._preemption_plan(req, for_memory)[0]

    def _spill_candidates(self, exclude: Request | None) -> list[tuple[str, int]]:
        """``(request id, spillable host blocks)`` of the swapped-out requests, coldest (last in
        queue order) first, without ``exclude`` and those swapped out in this step (their host
        copies are written only when the step runs)."""
        kv = self.kv
        out = []
        for r in reversed(self._order(self.swapped)):
            if r is exclude or r.request_id in self._step_swapped_out:
                continue
            n = kv.num_spill_blocks(r.request_id)
            if n:
                out.append((r.request_id, n))
        return out

    def _preemption_plan(self, req: Request, for_memory: bool) -> tuple[PreemptionMode, list[str], bool]:
        """``(mode, requests to spill first, disk full)``: how :meth:`_preempt` would take ``req``
        out; the last item says a swap was not possible only because the disk tier is full."""
        kv = self.kv
        if kv.host is None or not kv.has(req.request_id):
            return PreemptionMode.RECOMPUTE, [], False
        n = kv.num_swap_out_blocks(req.request_id)
        free = kv.num_free_host_blocks
        spill: list[str] = []
        spill_blocks: int | None = 0
        disk_full = False
        if n > free:
            spill_blocks = None
            if kv.disk is not None and self.disk_enabled and self.rates is not None:
                cands = self._spill_candidates(req)
                plan = plan_spill(n - free, cands, kv.num_free_disk_blocks)
                if plan is not None:
                    spill, spill_blocks = plan
                elif free + sum(c for _, c in cands) >= n:
                    disk_full = True  # the candidates would make room: the disk cannot take them
        d = choose_preemption_mode(
            blocks_to_copy=n,
            block_nbytes=self.block_nbytes,
            tokens_to_recompute=self._recompute_tokens(req, for_memory),
            host_free_blocks=free,
            rates=self.rates,
            spill_blocks=spill_blocks,
        )
        if d.mode is not PreemptionMode.SWAP:
            return d.mode, [], disk_full
        return d.mode, spill, False

    def _preempt(self, req: Request, out: SchedulerOutput, *, for_memory: bool = True) -> None:
        """Take ``req`` out of the batch: swap its KV out when a host pool can take it and that
        is cheaper than recomputing (``choose_preemption_mode``, the recompute counted by
        :meth:`_recompute_tokens`), else drop it (recompute). ``for_memory``: the blocks are
        needed now (False: MLFQ wants the batch slot only)."""
        if not _remove_identical(self.running, req):
            raise ValueError("list.remove(x): x not in list")
        kv = self.kv
        mode, spill, disk_full = self._preemption_plan(req, for_memory)
        if disk_full:
            self.num_disk_full += 1
        if mode is PreemptionMode.SWAP:
            for rid in spill:
                self._spill(rid, out)
            out.swap_out.extend(kv.swap_out(req))
            self._step_swapped_out.add(req.request_id)
            req.status = RequestStatus.SWAPPED
            req.num_preemptions += 1
            req.num_swaps += 1
            self.num_preemptions += 1
            self.num_swap_outs += 1
            self.swapped.append(req)
            out.preempted.append(req.request_id)
            out.swapped_out.append(req.request_id)
            return
        kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req.request_id)

    def _spill(self, request_id: str, out: SchedulerOutput) -> None:
        out.disk_out.extend(self.kv.spill(request_id))
        out.spilled.append(request_id)
        self.num_spills += 1

    def _promote_ahead(self, budget: int, out: SchedulerOutput) -> None:
        """Bring swapped-out KV back from disk to the host before it is needed: the swapped
        queue's head always (spilling colder host-resident requests when the host pool is short,
        so it cannot wait forever), then the next disk-resident requests in queue order while
        host slots and the step's remaining ``budget`` (disk time in tokens) allow."""
        kv = self.kv
        if kv.disk is None or not self.swapped:
            return
        order = self._order(self.swapped)
        skip = set(out.spilled)
        first = True
        for r in order:
            rid = r.request_id
            if rid in skip:
                break  # just spilled as the coldest: nothing after it is hotter
            n = kv.num_disk_blocks_of(rid)
            if n == 0:
                first = False
                continue
            cost = disk_budget_tokens(n, self.block_nbytes, self.rates)
            if first:
                short = n - kv.num_free_host_blocks
                if short > 0 and self.disk_enabled:
                    colder = [c for c in self._spill_candidates(r) if c[0] != rid]
                    later = {x.request_id for x in order[order.index(r) + 1 :]}
                    plan = plan_spill(short, [c for c in colder if c[0] in later], kv.num_free_disk_blocks)
                    if plan is not None:
                        for s in plan[0]:
                            self._spill(s, out)
                            skip.add(s)
                        spill_cost = disk_budget_tokens(plan[1], self.block_nbytes, self.rates)
                        out.swap_budget_tokens += spill_cost
                        budget -= spill_cost
            elif cost > budget:
                break
            if n > kv.num_free_host_blocks:
                break
            out.disk_in.extend(kv.promote(rid))
            out.promoted.append(rid)
            self.num_disk_promotions += 1
            out.swap_budget_tokens += cost
            budget -= cost
            first = False

    def _admit_prefetched(self, req: Request, budget: int, out: SchedulerOutput) -> int:
        """Run a prefetched request (its KV already on device): schedule its next tokens; returns
        the budget they take, 0 when it cannot run now (nothing changed)."""
        pend = req.num_pending_tokens
        n = 1 if pend == 1 else self._chunk(pend, budget)
        if n == 0 or not self.kv.allocate_slots(req, n):
            return 0
        req.status = RequestStatus.RUNNING
        out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
        return n

    def _prefetch(self, budget: int, just_preempted: set[str], out: SchedulerOutput) -> int:
        """Swap-in prefetch: swap the next host-resident swapped-out requests in queue order back
        to the device ahead of their turn, while the next step has a seat for each
        (``max_num_seqs``, counting the seats of running requests whose step samples their last
        token by ``max_tokens``), the pool keeps a free block per running request beyond their
        blocks, and the copies fit the step's remaining ``budget``. Returns the budget left."""
        kv = self.kv
        finishing = sum(
            1
            for sr in out.scheduled
            if sr.samples
            and (
                sr.request.prefill_only
                or len(sr.request.output_token_ids) + 1 >= sr.request.sampling_params.max_tokens
            )
        )
        seats = self.config.max_num_seqs - len(self.running) - len(self.prefetched) + finishing
        if self.config.policy is SchedulingPolicy.MLFQ:  # one queue: a waiting request may come first
            queue = self._order(self.swapped + self.waiting)
        else:
            queue = self._order(self.swapped)
        for req in queue:
            rid = req.request_id
            if seats <= 0 or req.status is not RequestStatus.SWAPPED:
                break  # no seat next step, or a waiting request takes the next one
            if rid in just_preempted or rid in self._step_swapped_out or kv.num_disk_blocks_of(rid):
                continue  # its host copy is not written yet / it is on disk
            blocks = kv.num_swap_in_blocks(rid)
            cost = swap_budget_tokens(blocks, self.block_nbytes, self.rates)
            if cost > budget or kv.swap_in_blocks_needed(req, 0) + len(self.running) + 1 > kv.num_free_blocks:
                break  # queue order: a later request does not go ahead of this one
            out.prefetch_in.extend(kv.swap_in(req))
            out.prefetched.append(rid)
            out.swap_budget_tokens += cost
            budget -= cost
            _remove_identical(self.swapped, req)
            self.prefetched.append(req)
            self.num_swap_ins += 1
            self.num_prefetches += 1
            seats -= 1
        return budget

    def _evict_prefetched(self, out: SchedulerOutput) -> None:
        """Give the device blocks of the coldest prefetched request back: swapped out again when
        the host (after spills, by cost) can take it, else dropped to recompute."""
        req = self._order(self.prefetched)[-1]
        _remove_identical(self.prefetched, req)
        self.num_prefetch_evictions += 1
        mode, spill, _ = self._preemption_plan(req, for_memory=True)
        if mode is PreemptionMode.SWAP:
            for rid in spill:
                self._spill(rid, out)
            out.swap_out.extend(self.kv.swap_out(req))
            self._step_swapped_out.add(req.request_id)
            self.num_swap_outs += 1
            self.swapped.append(req)
            return
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req.request_id)

    def drop_swapped(self, request_id: str) -> bool:
        """A swapped-out request whose KV the disk tier lost (a failed write, a checksum mismatch
        or a short read) falls back to recompute: its blocks on every tier are freed, it is queued
        to compute its prompt and output again (``num_disk_fallbacks``). Returns False (nothing
        changed) when the request is unknown or not swapped out (finished or aborted meanwhile)."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.SWAPPED:
            return False
        if not _remove_identical(self.swapped, req):
            _remove_identical(self.prefetched, req)
        self.kv.free(request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.append(req)
        self.num_disk_fallbacks += 1
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._step_swapped_out = set()
        self.kv.begin_step()
        self.iteration += 1
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        mlfq_on = self.config.policy is SchedulingPolicy.MLFQ
        now = 0.0
        if mlfq_on:
            assert self.clock is not None
            now = self.clock()
            self._time_iteration(now)
            self._promote_starving(now)
            self._mlfq_preempt(out, now)
        self.running = self._order(self.running)
        kv = self.kv
        running_status = RequestStatus.RUNNING
        scheduled = out.scheduled
        policy_preempted = len(out.preempted)
        evicted = self.num_prefetch_evictions

        # 1+2: running requests, decodes before partial prefills.
        # (request, pending tokens); a request's own pending count cannot change before its turn
        decodes: list[tuple[Request, int]] = []
        prefills: list[tuple[Request, int]] = []
        for r in self.running:
            pend = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if pend == 1:
                decodes.append((r, 1))
            elif pend > 1:
                prefills.append((r, pend))
        for req, pend in decodes + prefills:
            if budget <= 0:
                break
            if req.status is not running_status:
                continue  # preempted earlier in this loop
            n = 1 if pend == 1 else self._chunk(pend, budget)
            if n == 0:
                continue
            drafts = self._drafts(req, budget) if pend == 1 and self.drafter is not None else ()
            if drafts and kv.allocate_slots(req, 1 + len(drafts)):
                # speculation never preempts anyone: without room for the drafts, plain decode
                scheduled.append(ScheduledRequest(req, 1 + len(drafts), req.num_computed_tokens, drafts))
                scheduled_ids.add(req.request_id)
                budget -= 1 + len(drafts)
                continue
            ok = kv.allocate_slots(req, n)
            while not ok and self.prefetched:
                self._evict_prefetched(out)  # blocks held ahead of a turn go back first
                ok = kv.allocate_slots(req, n)
            while not ok:
                victim = self._preempt_victim(scheduled_ids)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is req:
                    break
                ok = kv.allocate_slots(req, n)
            if not ok:
                continue
            scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
            scheduled_ids.add(req.request_id)
            budget -= n

        # the step's swap-outs are copied before its forward pass: charge them to the budget
        cost = swap_budget_tokens(len(out.swap_out), self.block_nbytes, self.rates)
        cost += disk_budget_tokens(len(out.disk_out), self.block_nbytes, self.rates)
        out.swap_budget_tokens += cost
        budget -= cost

        # 3: swapped-out requests come back, then waiting requests are admitted (MLFQ: one queue
        # by level). Not after a preemption for memory in this step (it would thrash).
        if len(out.preempted) == policy_preempted:
            if mlfq_on:
                queue = self._order(self.prefetched + self.swapped + self.waiting)
            else:
                queue = self._order(self.prefetched) + self._order(self.swapped) + self._order(self.waiting)
            admitted: list[Request] = []
            just_preempted = set(out.preempted)  # not back in the step that took them out
            for req in queue:
                if budget <= 0 or len(self.running) + len(admitted) >= self.config.max_num_seqs:
                    break
                if req.request_id in just_preempted:
                    continue
                if req.status is RequestStatus.SWAPPED and not kv.is_swapped(req.request_id):
                    n = self._admit_prefetched(req, budget, out)
                    if n == 0:
                        break  # head-of-line: keep the order, wait for blocks
                    budget -= n
                    admitted.append(req)
                    continue
                if req.status is RequestStatus.SWAPPED:
                    if kv.disk is not None and kv.num_disk_blocks_of(req.request_id):
                        # on disk: promoted to the host at the end of a step first (_promote_ahead);
                        # the requests behind it go on (swapping them in frees host slots for it)
                        continue
                    n = self._swap_in(req, budget, out)
                    if n == 0:
                        break  # head-of-line: keep the order, wait for blocks
                    budget -= n
                    admitted.append(req)
                    continue
                cached = self.kv.find_cached_prefix(req)
                start = len(cached) * self.kv.block_size
                n = self._chunk(req.num_tokens - start, budget)
                if n == 0:
                    break
                req.num_computed_tokens = 0
                if not self.kv.allocate_slots(req, n, cached):
                    break  # head-of-line: keep priority order, wait for blocks
                req.num_computed_tokens = start
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = start
                req.status = RequestStatus.RUNNING
                admitted.append(req)
                out.scheduled.append(ScheduledRequest(req, n, start))
                budget -= n
            if admitted:
                if mlfq_on:
                    self._start_backoff(admitted)
                ids = {r.request_id for r in admitted}
                self.waiting = [r for r in self.waiting if r.request_id not in ids]
                self.swapped = [r for r in self.swapped if r.request_id not in ids]
                self.prefetched = [r for r in self.prefetched if r.request_id not in ids]
                self.running.extend(admitted)
            if self.config.swap_prefetch and kv.host is not None and self.num_prefetch_evictions == evicted:
                budget = self._prefetch(budget, just_preempted, out)  # not in a step that evicted one
        # 4: disk tier: promote the swapped queue's head (and prefetch the next ones) to the host
        self._promote_ahead(budget, out)
        if mlfq_on:
            for sr in scheduled:
                sr.request.last_served = now
        out.copy_blocks = kv.take_copies()
        return out

    def _drafts(self, req: Request, budget: int) -> tuple[int, ...]:
        """The drafts a decoding ``req`` is scheduled with: at most what its step may emit
        beyond one token (``max_tokens``, the context, the remaining budget)."""
        assert self.drafter is not None
        if req.prefill_only:
            return ()
        room = min(
            req.sampling_params.max_tokens - len(req.output_token_ids) - 1,
            self.config.max_model_len - req.num_tokens - 1,
            budget - 1,
        )
        if room <= 0:
            return ()
        return tuple(self.drafter(req, room)[:room])

    def _swap_in(self, req: Request, budget: int, out: SchedulerOutput) -> int:
        """Bring a swapped-out request back and schedule its next tokens; returns the budget it
        took (its tokens plus its copies' share), 0 when it cannot run now (nothing changed)."""
        kv = self.kv
        if kv.disk is not None and kv.num_disk_blocks_of(req.request_id):
            return 0  # on disk: promoted to the host at the end of a step first (_promote_ahead)
        cost = swap_budget_tokens(kv.num_swap_in_blocks(req.request_id), self.block_nbytes, self.rates)
        if out.scheduled and cost >= budget:
            return 0  # the copies alone fill the step; a step with nothing else takes them anyway
        pend = req.num_pending_tokens
        n = 1 if pend == 1 else self._chunk(pend, max(budget - cost, 1))
        if n == 0 or kv.swap_in_blocks_needed(req, n) > kv.num_free_blocks:
            return 0
        out.swap_in.extend(kv.swap_in(req))
        if not kv.allocate_slots(req, n):
            raise RuntimeError(f"swap-in of {req.request_id}: blocks counted free were not")
        req.status = RequestStatus.RUNNING
        self.num_swap_ins += 1
        out.swapped_in.append(req.request_id)
        out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
        out.swap_budget_tokens += cost
        return n + cost

    # ----------------------------------------------------------------- MLFQ
    def _promote_starving(self, now: float) -> None:
        """Anti-starvation (aging): a queued request not served for ``mlfq_starvation_s`` rises
        ``mlfq_promote_levels`` levels (:func:`engine.mlfq.promote`) and its wait restarts."""
        bound = self.config.mlfq_starvation_s
        up = self.config.mlfq_promote_levels
        for r in (*self.waiting, *self.swapped, *self.prefetched):
            if r.mlfq_level > 0 and mlfq.is_starving(now, r.last_served, bound):
                r.mlfq_level = mlfq.promote(r.mlfq_level, up)
                r.mlfq_iters = 0
                r.last_served = now
                self.num_promotions += 1

    def _queued_need(self, req: Request) -> int:
        """Device blocks a queued request needs to run its next step (upper bound for a waiting
        one: no prefix-cache hit assumed)."""
        if req.status is RequestStatus.SWAPPED and not self.kv.is_swapped(req.request_id):
            # prefetched: its KV is on device already, only its next tokens need blocks
            pend = req.num_pending_tokens
            n = 1 if pend == 1 else self._chunk(pend, self.config.max_num_batched_tokens) or 1
            held = self.kv.num_held_blocks(req.request_id)
            return max(0, self.kv.blocks_needed(req.num_computed_tokens + n) - held)
        if req.status is RequestStatus.SWAPPED:
            pend = req.num_pending_tokens
            return self.kv.swap_in_blocks_needed(
                req, 1 if pend == 1 else self._chunk(pend, self.config.max_num_batched_tokens) or 1
            )
        n = self._chunk(req.num_tokens, self.config.max_num_batched_tokens) or req.num_tokens
        return self.kv.blocks_needed(n)

    def _time_iteration(self, now: float) -> None:
        """Update :attr:`iteration_s`, the mean interval between schedule() calls while requests
        run (an idle engine's gaps are not iterations)."""
        prev, self._prev_now = self._prev_now, (now if self.running else None)
        if prev is None or not self.running:
            return
        dt = now - prev
        if dt > 0:
            self.iteration_s = dt if self.iteration_s is None else 0.9 * self.iteration_s + 0.1 * dt

    def _mlfq_preempt(self, out: SchedulerOutput, now: float) -> None:
        """Preemptive MLFQ with proactive swap-out: while the best queued request is at a higher
        level than the worst running one and the batch is full or admitting it would take the
        pool past ``mlfq_swap_watermark``, preempt the lowest-level running request whose KV the
        preemption keeps (:func:`engine.mlfq.preemptible`): swapped to the host pool, or, when
        only the batch slot is wanted, left in the prefix cache (usually cheaper than two
        copies; see :meth:`_preempt`). None such: the queued request waits for blocks (a drop
        would discard computed KV; with memory binding that thrashes)."""
        if not self.running or not (self.waiting or self.swapped or self.prefetched):
            return
        kv = self.kv
        reserve = (1 - self.config.mlfq_swap_watermark) * kv.num_blocks
        for q in self._order(self.prefetched + self.swapped + self.waiting):
            while True:
                lower = [r for r in self.running if r.mlfq_level > q.mlfq_level]
                if not lower:
                    return  # queue order: no later queued request is better either
                full = len(self.running) >= self.config.max_num_seqs
                tight = kv.num_free_blocks - self._queued_need(q) < reserve
                if not (full or tight):
                    break  # q fits: the admission phase takes it
                if not mlfq.waited_enough(
                    now - q.last_served, self.iteration_s, self.config.mlfq_preempt_wait_iters
                ):
                    self.num_wait_holds += 1
                    return  # a seat or blocks may free up first; later queued ones wait behind q
                worst_first = sorted(lower, key=_MLFQ_KEY, reverse=True)
                ready = [r for r in worst_first if r.mlfq_protected_until <= self.iteration]
                victim = next((r for r in ready if self._policy_may_preempt(r, tight)), None)
                if victim is None:
                    if len(ready) < len(worst_first):
                        self.num_backoff_holds += 1
                    # preempting any of them would throw work away, or they are backing off
                    # after a preemption: q waits for blocks, and so does every later queued
                    # request (the admission phase is head-of-line; a later one has no more
                    # victims than q)
                    return
                self._preempt(victim, out, for_memory=tight)

    def _start_backoff(self, admitted: list[Request]) -> None:
        """A request swapped out and back in is not preempted by the policy for
        :func:`engine.mlfq.swap_backoff_iters` iterations (doubling with its swaps)."""
        c = self.config
        for r in admitted:
            if r.num_swaps:
                r.mlfq_protected_until = self.iteration + mlfq.swap_backoff_iters(
                    r.num_swaps, c.mlfq_swap_backoff_iters, c.mlfq_swap_backoff_max_iters
                )

    def _policy_may_preempt(self, req: Request, for_memory: bool) -> bool:
        """Whether MLFQ may preempt running ``req`` for a higher-level request
        (:func:`engine.mlfq.preemptible`): the tokens its re-admission would compute again are 0
        when :meth:`_preempt` would swap it out, else :meth:`_recompute_tokens`."""
        swap = self._preemption_mode(req, for_memory) is PreemptionMode.SWAP
        lost = 0 if swap else self._recompute_tokens(req, for_memory)
        return mlfq.preemptible(lost, self.kv.block_size)

    # ----------------------------------------------------------------- results
    # ----------------------------------------------------------------- results
    def update_from_output(
        self, out: SchedulerOutput, sampled: Mapping[str, int | Sequence[int]]
    ) -> list[Request]:
        """Advance computed counts, append sampled tokens, retire finished requests.

        ``sampled`` maps request id -> token for every scheduled request whose step reached the
        end of its tokens; for a speculative decode (``spec_token_ids``), the verified run
        instead (:meth:`_update_speculative`). Returns the requests that finished (or,
        prefill-only, that prefilled) in this step; stop strings are the caller's (see
        :meth:`finish_request`).
        """
        done: list[Request] = []
        running_status = RequestStatus.RUNNING
        cache_blocks = self.kv.cache_blocks if self.kv.enable_prefix_caching else None
        max_len = self.config.max_model_len
        c = self.config
        mlfq_on = c.policy is SchedulingPolicy.MLFQ
        for s in out.scheduled:
            req = s.request
            if req.status is not running_status:
                continue  # aborted while the step ran
            if s.spec_token_ids:
                if self._update_speculative(s, sampled[req.request_id]):
                    done.append(req)
                continue
            req.num_computed_tokens = s.start + s.num_new_tokens
            if cache_blocks is not None:
                cache_blocks(req)
            if not s.samples:
                continue
            if mlfq_on:  # one iteration at its level; demoted after the level's quantum
                req.mlfq_level, req.mlfq_iters = mlfq.demote(
                    req.mlfq_level, req.mlfq_iters, c.mlfq_quantum_iters, c.mlfq_num_levels
                )
            tok = sampled[req.request_id]
            out_ids = req.output_token_ids
            out_ids.append(tok)
            sp = req.sampling_params
            n_out = len(out_ids)
            # check_stop's decision; inlined when no EOS/stop token can end the request here
            if n_out >= sp.min_tokens and ((not sp.ignore_eos and req.eos_token_ids) or sp.stop_token_ids):
                reason = self.check_stop(req, tok)
            elif n_out >= sp.max_tokens or len(req.prompt_token_ids) + n_out >= max_len:
                reason = FinishReason.LENGTH
            else:
                reason = None
            if req.prefill_only:
                if not _remove_identical(self.running, req):
                    raise ValueError("list.remove(x): x not in list")
                req.status = RequestStatus.PREFILLED
                req.finish_reason = FinishReason.PREFILLED
                done.append(req)
            elif reason is not None:
                self._finish(req, reason)
                done.append(req)
        return done

    def _update_speculative(self, s: ScheduledRequest, run: int | Sequence[int]) -> bool:
        """Apply a speculative decode's verified ``run``: the drafts the target kept (a prefix of
        ``s.spec_token_ids``) then the target's own token. Tokens are appended one at a time
        with the stop checks of a plain decode, so nothing past a stop is kept. Rolls back the
        rest: ``num_computed_tokens`` counts only the pending token and the kept drafts (the
        rejected drafts' KV slots are overwritten later), the blocks allocated only for rejected
        positions are freed, and only blocks full of kept tokens reach the prefix cache.
        Returns whether the request finished."""
        req = s.request
        drafts = s.spec_token_ids
        if isinstance(run, int) or not 1 <= len(run) <= len(drafts) + 1:
            raise ValueError(
                f"request {req.request_id}: a speculative step emits 1..{len(drafts) + 1} tokens"
            )
        if tuple(run[:-1]) != drafts[: len(run) - 1]:
            raise ValueError(f"request {req.request_id}: the verified run does not follow the drafts")
        c = self.config
        if c.policy is SchedulingPolicy.MLFQ:
            req.mlfq_level, req.mlfq_iters = mlfq.demote(
                req.mlfq_level, req.mlfq_iters, c.mlfq_quantum_iters, c.mlfq_num_levels
            )
        reason = None
        appended = 0
        for tok in run:
            req.output_token_ids.append(tok)
            appended += 1
            reason = self.check_stop(req, tok)
            if reason is not None:
                break
        req.num_computed_tokens = s.start + appended
        self.kv.trim(req.request_id, req.num_computed_tokens)
        if self.kv.enable_prefix_caching:
            self.kv.cache_blocks(req)
        if reason is not None:
            self._finish(req, reason)
            return True
        return False

    def check_stop(self, req: Request, tok: int) -> FinishReason | None:
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                req.stop_reason = tok
                return FinishReason.STOP
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return FinishReason.STOP
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if (
            not _remove_identical(self.running, req)
            and not _remove_identical(self.waiting, req)
            and not _remove_identical(self.swapped, req)
            and not _remove_identical(self.prefetched, req)
        ):
            self.paused.pop(req.request_id, None)
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        req.finish_reason = reason
        req.status = {
            FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
            FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
            FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
        }.get(reason, RequestStatus.FINISHED_STOPPED)
