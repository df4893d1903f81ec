"""One simulated engine instance: the real scheduler and KV manager driven by a latency model.

Each step: ``out = scheduler.schedule()``; its duration is ``latency.step_time`` of the batch
composition (prefill chunks with their contexts, decodes with their total context); at the end
``scheduler.update_from_output(out, sampled)`` with a dummy token for every sampling request.
The instance is also the router's :class:`router.policy.InstanceView` of itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.block_hash import BlockHash
from engine.block_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.swap_policy import RateEstimator
from pdserve.errors import InvalidRequestError, RequestNotFoundError
from router.policy import InstanceRole
from simulator.adapters import AdapterResidency, Pin
from simulator.events import EventLoop
from simulator.latency import LatencyModel
from simulator.offload import OffloadPlan, step_blocks
from simulator.prefix_store import PrefixStore
from simulator.tiered_store import TieredPrefixStore

DUMMY_TOKEN = 0


class _DummyTokens(dict):
    """``sampled`` mapping for ``update_from_output``: every request samples ``DUMMY_TOKEN``.

    A missing id is stored on first lookup, so later steps of the request hit the dict in C
    instead of calling ``__missing__``; each instance has its own (one entry per request that
    ran there, dropped with the instance at the end of a run).
    """

    def __missing__(self, key: str) -> int:
        self[key] = DUMMY_TOKEN
        return DUMMY_TOKEN


@dataclass
class StepReport:
    """What one step did, handed to the cluster when it ends."""

    instance: SimInstance
    out: SchedulerOutput
    start: float
    end: float
    started: list[Request]  # first scheduled in this step (queueing ends)
    first_tokens: list[Request]  # produced their first output token
    done: list[Request]  # finished, or prefilled (prefill-only)


@dataclass
class InstanceStats:
    steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    imported_blocks: int = 0
    import_failures: int = 0
    disk_blocks: int = 0  # KV blocks of host-pool hits read from its disk tier
    swap_s: float = 0.0  # step time spent copying swapped KV blocks
    swap_disk_s: float = 0.0  # step time spent moving swapped KV between host and the disk tier
    swap_disk_blocks: int = 0  # swapped KV blocks spilled to / promoted from the disk tier
    migrations_out: int = 0  # live migrations that moved a request off this instance
    migrations_in: int = 0
    migrated_blocks: int = 0  # KV blocks copied out of this instance by migrations (re-sent ones too)
    offload_s: float = 0.0  # step time added by weight / KV offloading (the copies not hidden by compute)


class SimInstance:
    def __init__(
        self,
        instance_id: str,
        role: InstanceRole,
        scheduler: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        latency: LatencyModel,
        loop: EventLoop,
        on_step: Callable[[StepReport], Any],
        *,
        enable_prefix_caching: bool = True,
        host_pool: PrefixStore | TieredPrefixStore | None = None,
        tp: int = 1,
        disk_bytes_per_s: float = 3e9,
        swap_space_bytes: int = 0,
        swap_bytes_per_s: float = 25e9,
        swap_disk_bytes: int = 0,
        adapters: AdapterResidency | None = None,
        offload: OffloadPlan | None = None,
    ) -> None:
        """``host_pool``: the instance's host KV pool; a :class:`TieredPrefixStore` adds a disk
        tier behind it, whose hits delay the request's start by their bytes / ``disk_bytes_per_s``
        (host-pool DRAM hits are free, as before).

        ``swap_disk_bytes``: the engine's disk tier for swapped-out KV behind the swap pool
        (``EngineConfig.swap_disk_bytes``): the engine's scheduler spills and promotes as in the
        engine (promotion ahead of the turn included), and each step's spills and promotions add
        blocks * block bytes / ``disk_bytes_per_s`` to its time (synchronous, as on the engine's
        CPU path).

        ``adapters``: the instance's LoRA adapter tiers (``simulator.adapters``): a request naming
        an adapter pins a slot before it enters the scheduler, waiting outside it (arrival order)
        for a free slot or the adapter's disk read; slot copies lengthen the next step and LoRA
        batches cost ``AdapterConfig.step_factor`` times the latency model's step.

        ``offload``: the instance's weight / KV placement (``simulator.offload``): each step takes
        ``offload.step_s`` of the latency model's step, the blocks the step's requests use
        (``simulator.offload.step_blocks``, what the engine stages) and the step's tokens (the
        engine's ``predict_step_s``); ``num_blocks`` is then the plan's pool."""
        if offload is not None and offload.num_blocks != num_blocks:
            raise ValueError(
                f"num_blocks {num_blocks} is not the offload plan's pool ({offload.num_blocks} blocks)"
            )
        self.offload = offload if offload is not None and offload.offloads else None
        self.disk_bytes_per_s = disk_bytes_per_s
        self.instance_id = instance_id
        self.role = role
        self.tp = tp
        block_nbytes = max(1, block_size * latency.kv_bytes_per_token)
        self.kv = KVCacheManager(
            num_blocks,
            block_size,
            model_id="sim",
            enable_prefix_caching=enable_prefix_caching,
            num_host_blocks=swap_space_bytes // block_nbytes,
            num_disk_blocks=swap_disk_bytes // block_nbytes if swap_space_bytes >= block_nbytes else 0,
        )
        self.block_nbytes = block_nbytes
        self.swap_bytes_per_s = swap_bytes_per_s
        # the simulated clock (MLFQ's starvation bound) and the latency model's prefill time (its
        # skip-join level): the engine's scheduler runs here as is
        self.sched = Scheduler(
            scheduler,
            self.kv,
            clock=loop.now,
            prefill_time=lambda n: latency.prefill_time([n]),
            block_nbytes=block_nbytes,
        )
        # swap or recompute, chosen by the scheduler from the engine's own estimator: seeded with
        # the copy (and disk) bandwidth as the engine seeds it at start, then fed every simulated
        # step's compute time as the engine feeds it (``RateEstimator.observe_step``): the recompute rate is
        # the measured prefill throughput, and before any prefill (a disaggregated decode instance
        # adopts its prompts' KV) the decode-only steps' token rate stands in, as on a real worker
        self.rates: RateEstimator | None = None
        if swap_space_bytes >= block_nbytes:
            self.rates = RateEstimator()
            self.rates.observe_copy(block_nbytes, block_nbytes / swap_bytes_per_s)
            if self.kv.disk is not None:
                self.rates.observe_disk(block_nbytes, block_nbytes / disk_bytes_per_s)
            self.sched.set_swap_rates(self.rates.rates)  # None until a step is measured, as in the engine
        self.latency = latency
        self.loop = loop
        self.on_step = on_step
        self.host_pool = host_pool
        self.block_size = block_size
        self.total_blocks = num_blocks
        self.token_budget = scheduler.max_num_batched_tokens
        self.queued_tokens = 0
        self.busy = False
        self.pending: deque[Any] = deque()  # decode handoffs waiting for blocks (owned by the cluster)
        self.in_transfer = 0  # handoffs holding blocks here whose KV is still in flight
        self.stats = InstanceStats()
        self._started: set[str] = set()
        self._loader_seq = 0
        self._retry: list[tuple[Request, int]] = []
        self._sampled = _DummyTokens()
        self._pause_q: list[tuple[str, Callable[[bool], Any]]] = []  # live migration's stop-and-copy
        # LoRA adapters: requests waiting for a slot or a disk read (with when they began to
        # wait), slot copies charged to the next step, reads whose end is scheduled, and the
        # cluster's hook called when a read ends (decode handoffs waiting for it)
        self.adapters = adapters
        self._lora_waiting: dict[str, tuple[Request, float]] = {}
        self._copy_s = 0.0
        self._reads: set[str] = set()
        self.on_adapter_read: Callable[[SimInstance], Any] | None = None

    # ------------------------------------------------------------------ InstanceView
    @property
    def queued_requests(self) -> int:
        return len(self.sched.waiting) + len(self.pending) + len(self._lora_waiting)

    @property
    def running_requests(self) -> int:
        return len(self.sched.running)

    @property
    def free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def hbm_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of ``hashes`` in this instance's GPU prefix cache."""
        if not self.kv.enable_prefix_caching or not self.kv.pool.num_cached_blocks:
            return 0
        lookup = self.kv.pool.lookup
        n = 0
        for h in hashes:
            if lookup(h) is None:
                break
            n += 1
        return n

    def adapter_load_s(self, adapter: str) -> float:
        """Seconds before a request for LoRA ``adapter`` can run here (0: in a slot, the base
        model, or no adapters configured): its load, reads queued ahead and the wait for a slot
        when all are pinned, priced by the router's own code from what a worker's heartbeat
        reports (``AdapterResidency.ready_s``)."""
        if not adapter or self.adapters is None:
            return 0.0
        return self.adapters.ready_s(adapter, self.loop.now(), len(self._lora_waiting))

    def try_pin_adapter(self, adapter: str) -> bool:
        """Pin ``adapter`` in a slot for one request (True; its copy, if any, is charged to the
        next step). False: every slot is pinned, or its disk read is under way (started now if
        needed; when it ends the instance kicks itself and calls :attr:`on_adapter_read`)."""
        assert self.adapters is not None
        pin, x = self.adapters.acquire(adapter, self.loop.now())
        if pin is Pin.PINNED:
            self._copy_s += x
            return True
        if pin is Pin.READING and adapter not in self._reads:
            self._reads.add(adapter)
            self.loop.at(x, self._read_done, adapter)
        return False

    def _read_done(self, adapter: str) -> None:
        assert self.adapters is not None
        self._reads.discard(adapter)
        self.adapters.read_done(adapter)
        self.kick()
        if self.on_adapter_read is not None:
            self.on_adapter_read(self)

    def _admit_lora_waiting(self) -> None:
        """Hand waiting adapter requests to the scheduler, in arrival order, while slots allow
        (``LLMEngine._admit_lora_waiting``)."""
        assert self.adapters is not None
        now = self.loop.now()
        for rid, (req, since) in list(self._lora_waiting.items()):
            if not self.try_pin_adapter(req.adapter_id):
                continue
            del self._lora_waiting[rid]
            self.adapters.stats.wait_s += now - since
            self.sched.add_request(req)  # validated when it arrived

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        hbm = self.hbm_prefix_blocks(hashes)
        if self.host_pool is None:
            return hbm
        return max(hbm, self.host_pool.contains_prefix(hashes))

    # ------------------------------------------------------------------ intake
    def submit(
        self,
        req: Request,
        fetched_blocks: int = 0,
        on_invalid: Callable[[InvalidRequestError], Any] | None = None,
    ) -> None:
        """Queue a request (its prefix: ``fetched_blocks`` pulled from elsewhere, plus host-pool hits).

        Raises ``InvalidRequestError`` when the request can never run here; when its start waits
        for a disk-tier read, that error is found after the read and goes to ``on_invalid``
        instead (raised if None).
        """
        hashes = req.block_hashes
        want = fetched_blocks
        disk_s = 0.0
        if isinstance(self.host_pool, TieredPrefixStore) and hashes:
            pool, stride = self.host_pool, self.host_pool.stride
            hit = pool.peek(hashes)
            use = hit.blocks
            # disk-tier blocks the GPU prefix cache does not already hold must be read first
            hbm = self.hbm_prefix_blocks(hashes)
            reads = sum(1 for j, in_dram in enumerate(hit.tiers) if not in_dram and (j + 1) * stride > hbm)
            if reads:
                # reading them must beat recomputing them: else use the leading DRAM-resident run
                # only (what a router's transfer-time model would choose)
                nbytes = reads * stride * self.block_size * self.latency.kv_bytes_per_token
                disk_s = nbytes / self.disk_bytes_per_s
                cap = (req.num_prompt_tokens - 1) // self.block_size
                with_disk = min(hit.blocks * stride, cap) * self.block_size
                without = min(max(hit.dram_run * stride, fetched_blocks, hbm), cap) * self.block_size
                n = req.num_prompt_tokens
                saved = self.latency.prefill_time([n - without], [without]) - self.latency.prefill_time(
                    [n - with_disk], [with_disk]
                )
                if disk_s >= saved or with_disk <= without:
                    use, disk_s = hit.dram_run, 0.0
                else:
                    self.stats.disk_blocks += reads * stride
            pool.lookup(hashes[: use * stride])
            want = max(want, use * stride)
        elif self.host_pool is not None and hashes:
            want = max(want, self.host_pool.prefix_blocks(hashes))
        want = min(want, len(hashes), (req.num_prompt_tokens - 1) // self.block_size)
        if disk_s > 0:
            self.queued_tokens += req.num_prompt_tokens  # the router sees it queued meanwhile
            self.loop.after(disk_s, self._enqueue, req, want, on_invalid, True)
        else:
            self._enqueue(req, want, None)

    def _enqueue(
        self,
        req: Request,
        want: int,
        on_invalid: Callable[[InvalidRequestError], Any] | None,
        counted: bool = False,
    ) -> None:
        """Import the prefix and queue ``req`` (``counted``: its tokens are already in
        ``queued_tokens``, added when its disk read began)."""
        if want > 0 and not self._import_prefix(req.block_hashes[:want]):
            self._retry.append((req, want))  # no room now: retry before each step while it waits
        adapter = req.adapter_id
        if adapter and self.adapters is None:
            raise InvalidRequestError(
                f"LoRA adapter {adapter!r} is not served: this instance has no adapters"
            )
        pinned = not adapter or self.try_pin_adapter(adapter)
        try:
            self.sched.add_request(req)
            if not pinned:
                # as the engine: validated by the scheduler, then waits outside it for its adapter
                self.sched.abort_request(req.request_id)
                req.status, req.finish_reason = RequestStatus.WAITING, None
                self._lora_waiting[req.request_id] = (req, self.loop.now())
        except InvalidRequestError as e:
            if adapter and pinned:
                assert self.adapters is not None
                self.adapters.release(adapter)
            if counted:
                self.queued_tokens -= req.num_prompt_tokens
            if on_invalid is None:
                raise
            on_invalid(e)
            return
        if not counted:
            self.queued_tokens += req.num_prompt_tokens
        self.kick()

    def _import_prefix(self, hashes: Sequence[BlockHash]) -> bool:
        """Load KV blocks keyed ``hashes`` into the GPU prefix cache (engine API only).

        A loader request reuses what is already cached, allocates the rest, registers them and
        frees: the blocks stay cached at the MRU end of the free queue, as after a real KV import.
        """
        k = len(hashes)
        bs = self.block_size
        self._loader_seq += 1
        loader = Request(
            f"__import-{self.instance_id}-{self._loader_seq}",
            range(k * bs + 1),
            _LOADER_PARAMS,
            block_hashes=list(hashes),
        )
        cached = self.kv.find_cached_prefix(loader)
        h = len(cached)
        if h >= k:
            return True
        if not self.kv.allocate_slots(loader, (k - h) * bs, cached):
            self.stats.import_failures += 1
            return False
        loader.num_computed_tokens = k * bs
        self.kv.cache_blocks(loader)
        self.kv.free(loader.request_id)
        self.stats.imported_blocks += k - h
        return True

    def _retry_imports(self) -> None:
        keep = []
        for req, k in self._retry:
            if req.status is RequestStatus.WAITING and not self._import_prefix(req.block_hashes[:k]):
                keep.append((req, k))
        self._retry = keep

    def adopt(self, req: Request, num_tokens: int) -> bool:
        """Reserve blocks for a prefilled request's ``num_tokens`` KV (decode side). False: no room."""
        need = self.kv.blocks_needed(num_tokens + 1)
        if self.kv.num_free_blocks < need:
            return False
        self.kv.adopt_blocks(req, num_tokens)
        return True

    def start_decoding(self, req: Request) -> None:
        """Join the batch with KV in place (after ``adopt`` and the transfer)."""
        self.sched.add_running(req)
        self.kick()

    def release_prefilled(self, request_id: str) -> None:
        self.sched.release_prefilled(request_id)
        self.kick()

    # ------------------------------------------------------------------ live migration
    def pause_at_boundary(self, request_id: str, then: Callable[[bool], Any]) -> None:
        """Take a decoding request out of the batch at the next step boundary (now when idle),
        keeping its blocks (``Scheduler.pause_request``), then call ``then(paused)``; ``paused`` is
        False when it is no longer a running decode here (finished, preempted) and nothing changed."""
        if self.busy:
            self._pause_q.append((request_id, then))
        else:
            then(self._pause(request_id))

    def _pause(self, request_id: str) -> bool:
        r = self.sched.requests.get(request_id)
        if r is None or r.status is not RequestStatus.RUNNING or not r.is_decoding:
            return False
        try:
            self.sched.pause_request(request_id)
        except (InvalidRequestError, RequestNotFoundError):
            return False
        return True

    def resume(self, request_id: str) -> None:
        """Put a paused request back into the batch (its migration was aborted)."""
        self.sched.resume_request(request_id)
        self.kick()

    def migrated_out(self, request_id: str) -> None:
        """The paused request now runs elsewhere: retire it here and free its blocks."""
        self.sched.abort_request(request_id)
        self._started.discard(request_id)
        self.kick()

    # ------------------------------------------------------------------ steps
    def kick(self) -> None:
        if not self.busy:
            self._start_step()

    def _start_step(self) -> None:
        sched = self.sched
        if self._lora_waiting:
            self._admit_lora_waiting()
        if self._retry:
            self._retry_imports()
        out = sched.schedule()
        if not out.scheduled:
            moved = len(out.disk_out) + len(out.disk_in)
            if moved:
                # only disk traffic this step (e.g. the swapped queue's head promoted while
                # nothing runs): it takes its time, then the next step is planned
                dt = moved * self.block_nbytes / self.disk_bytes_per_s
                self.stats.swap_disk_s += dt
                self.stats.swap_disk_blocks += moved
                self.stats.busy_s += dt
                self.busy = True
                self.loop.at(self.loop.now() + dt, self._start_step)
                return
            self.busy = False
            return
        if out.preempted:
            swapped = set(out.swapped_out)
            for rid in out.preempted:
                r = sched.requests.get(rid)
                if r is not None and rid not in swapped:  # recomputed: its tokens are queued again
                    self.queued_tokens += r.num_tokens
                    self._started.discard(rid)
        pre_tok: list[int] = []
        pre_ctx: list[int] = []
        n_dec = 0
        dec_ctx = 0
        started: list[Request] = []
        firsts: list[Request] = []
        started_ids = self._started
        q = 0
        for s in out.scheduled:
            n = s.num_new_tokens
            req = s.request
            if n == 1 and req.output_token_ids:
                n_dec += 1
                dec_ctx += s.start
                continue
            pre_tok.append(n)
            pre_ctx.append(s.start)
            q += n
            rid = req.request_id
            if rid not in started_ids:
                started_ids.add(rid)
                q += s.start
                started.append(req)
            if s.samples and not req.output_token_ids:
                firsts.append(req)
        self.queued_tokens -= q
        dt = self.latency.step_time(pre_tok, pre_ctx, n_dec, dec_ctx)
        st = self.stats
        if self.offload is not None:  # the engine's cost model: copies the compute does not hide
            base = dt
            dt = self.offload.step_s(base, step_blocks(self.kv, out.scheduled), sum(pre_tok) + n_dec)
            st.offload_s += dt - base
        if self.adapters is not None:
            dt = dt * self._lora_factor(out) + self._copy_s
            self._copy_s = 0.0
        compute_s = dt  # the step's time less its swap and disk copies, as the engine measures it
        if out.swap_out or out.swap_in or out.prefetch_in:  # copies (prefetches after the forward pass)
            n = len(out.swap_out) + len(out.swap_in) + len(out.prefetch_in)
            swap_s = n * self.block_nbytes / self.swap_bytes_per_s
            dt += swap_s
            st.swap_s += swap_s
        if out.disk_out or out.disk_in:  # spills before the copies, promotions after them
            moved = len(out.disk_out) + len(out.disk_in)
            disk_s = moved * self.block_nbytes / self.disk_bytes_per_s
            dt += disk_s
            st.swap_disk_s += disk_s
            st.swap_disk_blocks += moved
        if self.rates is not None:  # as LLMEngine._observe_step feeds the engine's estimator
            self.rates.observe_step(sum(pre_tok), n_dec, compute_s)
            self.sched.set_swap_rates(self.rates.rates)
        st.steps += 1
        st.busy_s += dt
        st.prefill_tokens += q
        st.decode_tokens += n_dec
        self.busy = True
        now = self.loop.now()
        self.loop.at(now + dt, self._end_step, out, now, started, firsts)

    def _lora_factor(self, out: SchedulerOutput) -> float:
        """``AdapterConfig.step_factor`` of the step's batch."""
        assert self.adapters is not None
        names: set[str] = set()
        lora = tokens = 0
        for s in out.scheduled:
            n = s.num_new_tokens
            tokens += n
            a = s.request.adapter_id
            if a:
                names.add(a)
                lora += n
        return self.adapters.cfg.step_factor(len(names), lora, tokens)

    def _end_step(
        self, out: SchedulerOutput, start: float, started: list[Request], firsts: list[Request]
    ) -> None:
        done = self.sched.update_from_output(out, self._sampled)
        if self.adapters is not None:
            for r in done:  # finished, or prefilled here: the slot is no longer needed
                if r.adapter_id:
                    self.adapters.release(r.adapter_id, self.loop.now())
        for r in firsts:
            self._started.discard(r.request_id)
        for r in done:
            self._started.discard(r.request_id)
        self.on_step(StepReport(self, out, start, self.loop.now(), started, firsts, done))
        if self._pause_q:
            q, self._pause_q = self._pause_q, []
            for rid, then in q:
                then(self._pause(rid))
        self._start_step()


_LOADER_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
