"""Iteration-level scheduler (Orca) with a per-step token budget and chunked prefill (Sarathi).

Pure policy: no torch, no I/O, no clock of its own. Each call to :meth:`Scheduler.schedule`
decides which requests run in the next model step and how many tokens each computes:

1. Running requests that are decoding (exactly one pending token) go first, in priority order,
   one token each. When the KV pool cannot supply a slot, the least important running request
   is preempted (its blocks are freed; it will recompute), so a decode never stalls behind a
   prompt.
2. Running requests that are part-way through their prefill get the next chunk.
3. Waiting requests are admitted in priority order (lowest ``priority`` value, then arrival),
   after their cached prefix is reused, while budget, ``max_num_seqs`` and blocks allow.

Chunks are bounded by ``long_prefill_token_threshold`` (Sarathi's chunk: 512 for strict SLOs,
2048 relaxed) and the remaining budget. :meth:`update_from_output` applies the sampled tokens,
checks token-level stop conditions and retires finished requests. The same class drives the
real engine and the simulator.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter

from engine.block_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from pdserve.errors import InvalidRequestError, RequestNotFoundError

_SORT_KEY = attrgetter("priority", "arrival_time", "seq_no")


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


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget per step
    max_num_seqs: int = 64  # running requests at most
    long_prefill_token_threshold: int = 512  # chunk size (0 = only the budget bounds a chunk)
    enable_chunked_prefill: bool = True
    policy: SchedulingPolicy = SchedulingPolicy.PRIORITY
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(init=False, slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before this step
    samples: bool  # reaches the end of the request's tokens, so a token is sampled (derived)

    def __init__(self, request: Request, num_new_tokens: int, start: int) -> None:
        self.request = request
        self.num_new_tokens = num_new_tokens
        self.start = start
        self.samples = start + num_new_tokens == len(request.prompt_token_ids) + len(request.output_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

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
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ----------------------------------------------------------------- intake
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        if req.num_tokens > self.config.max_model_len:
            raise InvalidRequestError(
                f"prompt has {req.num_tokens} tokens, the model's context is {self.config.max_model_len}"
            )
        if self.kv.blocks_needed(req.num_tokens + 1) > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt of {req.num_tokens} tokens needs more KV blocks than this engine has "
                f"({self.kv.num_blocks} x {self.kv.block_size} tokens)"
            )
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Adopt a request whose KV is already in place (decode role / migration)."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
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
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------- schedule
    def _order(self, reqs: list[Request]) -> list[Request]:
        if self.config.policy is SchedulingPolicy.PRIORITY:
            return sorted(reqs, key=_SORT_KEY)  # == Request.sort_key, without a Python call each
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
        return max(cands, key=Request.sort_key)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        if not _remove_identical(self.running, req):
            raise ValueError("list.remove(x): x not in list")
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        self.running = self._order(self.running)
        kv = self.kv
        running_status = RequestStatus.RUNNING
        scheduled = out.scheduled

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

        # 3: admit waiting requests.
        if not out.preempted:
            self.waiting = self._order(self.waiting)
            admitted: list[Request] = []
            for req in self.waiting:
                if budget <= 0 or len(self.running) + len(admitted) >= self.config.max_num_seqs:
                    break
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
                ids = {r.request_id for r in admitted}
                self.waiting = [r for r in self.waiting if r.request_id not in ids]
                self.running.extend(admitted)
        return out

    # ----------------------------------------------------------------- results
    def update_from_output(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, retire finished requests.

        ``sampled`` maps request id -> token for every scheduled request whose step reached the
        end of its tokens. Returns the requests that finished (or, prefill-only, that prefilled)
        in this step; stop strings are the caller's (see :meth:`finish_request`).
        """
        done: list[Request] = []
        running_status = RequestStatus.RUNNING
        cache_blocks = self.kv.cache_blocks if self.kv.enable_prefix_caching else None
        max_len = self.config.max_model_len
        for s in out.scheduled:
            req = s.request
            if req.status is not running_status:
                continue  # aborted while the step ran
            req.num_computed_tokens = s.start + s.num_new_tokens
            if cache_blocks is not None:
                cache_blocks(req)
            if not s.samples:
                continue
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
        if not _remove_identical(self.running, req):
            _remove_identical(self.waiting, req)
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        req.finish_reason = reason
        req.status = {
            FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
            FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
            FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
        }.get(reason, RequestStatus.FINISHED_STOPPED)
