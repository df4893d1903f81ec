"""Live migration of a running (decoding) request between two engines (Llumnix, OSDI'24).

The source keeps decoding while its KV is copied in stages; only the last stage stops it:

1. :meth:`MigrationExport.header` (the request's identity, prompt, sampling parameters and the
   sampler's seed) and :meth:`MigrationExport.next_stage` (stage 1): the *full* blocks filled so
   far. A full block's KV never changes while the request holds it, so it can be copied while
   the request keeps decoding.
2. ``next_stage`` again (stages 2..n): the full blocks filled meanwhile (one per ``block_size``
   decoded tokens), until few are left (the caller's policy: :meth:`MigrationExport.pending_blocks`).
3. :meth:`MigrationExport.stop_and_copy`: the request leaves the source's batch (its blocks and
   state are kept: :meth:`engine.scheduler.Scheduler.pause_request`), and the remaining full
   blocks, the last partial block and the token state (every output token, the detokenizer's
   state, the logprobs) are copied.
4. The destination (:class:`MigrationImport`) allocates blocks as each stage arrives (refusing
   cleanly with ResourceExhaustedError when it is short), writes the KV, and on the final stage
   inserts the request as running: its next step feeds the last sampled token and samples the
   next one exactly as the source would have (seeded sampling draws from ``(seed, output
   index)`` only, see :mod:`engine.sampler`, and both travel).
5. :meth:`MigrationExport.commit` (the destination took it) frees the source's copy, or
   :meth:`MigrationExport.resume` (it did not) puts the request back into the source's batch.

Aborts: :meth:`MigrationImport.abort` frees every block the destination allocated;
:meth:`MigrationExport.abort_migration` resumes the request on the source if it is paused. A
request that finishes, is aborted (cancelled), or is preempted on the source while its stages are
copied makes the next source call raise :class:`MigrationAborted` naming why
(:class:`AbortReason`); the source then holds nothing for the migration (its blocks went with the
request, or stay with it). Blocks the request shares with others on the source (prefix-cache
hits) are only read: commit drops the request's reference, the other holders keep theirs.

Threading: every method runs on the engine's thread, between steps (``EngineLoop.call``).
LoRA requests move with their adapter: the destination must serve it (ModelNotFoundError
otherwise, before anything is allocated) and pins a slot for it when the request is inserted
(ResourceExhaustedError when every slot is in use: the migration aborts and the request resumes on
the source); the source's pin is released with the request at commit.
Not supported (refused with InvalidRequestError naming it): sliding-window engines (blocks leave
the window while stages are copied), requests that are not decoding (waiting, in prefill,
preempted, swapped out, prefill-only).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.block_hash import BlockHash, chain_hashes
from engine.block_manager import NULL_BLOCK
from engine.llm_engine import LLMEngine
from engine.model_runner import KVShape
from engine.outputs import TokenLogprob
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer
from pdserve.errors import (
    InvalidRequestError,
    LayoutMismatchError,
    PdserveError,
    RequestNotFoundError,
    ResourceExhaustedError,
)


class AbortReason(enum.Enum):
    """Why a migration stopped without moving the request."""

    SOURCE_FINISHED = "source_finished"  # it ended (stop / length) on the source meanwhile
    CANCELLED = "cancelled"  # it was aborted on the source meanwhile (client cancel, deadline)
    SOURCE_PREEMPTED = "source_preempted"  # the source preempted/swapped it: its KV moved or went
    DEST_FULL = "dest_full"  # the destination has not enough free blocks
    PEER_DIED = "peer_died"  # the other side went away mid-copy


class MigrationAborted(PdserveError):
    """The migration cannot go on; ``reason`` says why. Whatever the raising side allocated for
    it is released before this is raised."""

    def __init__(self, reason: AbortReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MigrationHeader:
    """What the destination needs before any KV: identity, prompt, sampling, the sampler's seed
    and the KV layout (checked against the destination's)."""

    request_id: str
    model_id: str
    shape: KVShape
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    priority: int = 0
    adapter_id: str = ""
    cache_salt: str = ""


@dataclass
class KVStage:
    """KV of the logical blocks ``[first_block, first_block + len(blocks))`` of the request,
    ``blocks`` shaped ``[n, num_layers, 2, block_size, kvh, hd]`` (``n`` may be 0).
    ``token_ids``: the tokens whose KV the blocks hold (set by the source: a transport keying the
    blocks needs them; the last block of the final stage may be partial)."""

    first_block: int
    blocks: torch.Tensor
    token_ids: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])


@dataclass
class FinalState:
    """The stop-and-copy stage: the last blocks (the partial one included) and the token state.

    ``num_computed_tokens``: tokens whose KV is in the blocks (prompt + outputs but the last
    sampled one, which the destination feeds next). ``output_token_ids``: every output token so
    far (the resume index of the token stream is its length). ``detok_text`` /
    ``detok_emitted``: the source's incremental detokenizer (stop-string hold-back included).
    ``logprobs``: of every output token, when they were requested."""

    stage: KVStage
    num_computed_tokens: int
    output_token_ids: list[int]
    detok_text: str = ""
    detok_emitted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _check_migratable(engine: LLMEngine, request_id: str) -> Request:
    tr = engine._tracked.get(request_id)
    if tr is None:
        raise RequestNotFoundError(f"no running request with id {request_id!r} on this engine")
    if engine.kv.sliding_window is not None:
        raise InvalidRequestError("live migration of a sliding-window model is not supported")
    req = tr.req
    if req.prefill_only or req.status is not RequestStatus.RUNNING or not req.is_decoding:
        raise InvalidRequestError(
            f"request {request_id!r} is not decoding (status {req.status.value}, "
            f"{req.num_pending_tokens} pending tokens): only a decoding request can be migrated"
        )
    return req


class MigrationExport:
    """Source side of one request's live migration (see the module docstring)."""

    def __init__(self, engine: LLMEngine, request_id: str) -> None:
        """Raises RequestNotFoundError / InvalidRequestError when the request cannot migrate."""
        self.engine = engine
        self.request_id = request_id
        self.req = _check_migratable(engine, request_id)
        self._preemptions = self.req.num_preemptions
        self._table = engine.kv.block_table(request_id)
        self.blocks_sent = 0  # logical blocks copied so far
        self.paused = False
        self.paused_at: float | None = None  # time.monotonic() when stop_and_copy paused it
        self.done = False

    # ------------------------------------------------------------- state checks
    def _check_alive(self) -> None:
        """Raise MigrationAborted when the request left the running state on the source."""
        req = self.req
        if req.status.finished or self.engine._tracked.get(self.request_id) is None:
            if req.status is RequestStatus.FINISHED_ABORTED:
                raise MigrationAborted(AbortReason.CANCELLED, f"request {self.request_id!r} was aborted")
            raise MigrationAborted(AbortReason.SOURCE_FINISHED, f"request {self.request_id!r} finished")
        if (
            req.status is not RequestStatus.RUNNING
            or req.num_preemptions != self._preemptions
            or self.engine.kv.block_table(self.request_id)[: len(self._table)] != self._table
        ):
            raise MigrationAborted(
                AbortReason.SOURCE_PREEMPTED,
                f"request {self.request_id!r} was preempted on the source: its KV blocks changed",
            )

    def _copy(self, start: int, end: int) -> KVStage:
        table = self.engine.kv.block_table(self.request_id)
        self._table = table
        ids = table[start:end]
        if NULL_BLOCK in ids:
            raise RuntimeError(f"request {self.request_id!r} lost blocks during migration")
        blocks = (
            self.engine.runner.export_blocks(ids)
            if ids
            else torch.empty((0, *self._block_shape()), dtype=self.engine.kv_shape.dtype)
        )
        if blocks.device.type != "cpu":
            blocks = blocks.cpu()
        self.blocks_sent = end
        bs = self.engine.kv.block_size
        tokens = self.req.token_slice(start * bs, min(end * bs, self.req.num_computed_tokens))
        return KVStage(start, blocks, tokens)

    def _block_shape(self) -> tuple[int, ...]:
        s = self.engine.kv_shape
        return (s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim)

    # ------------------------------------------------------------- stages
    def header(self) -> MigrationHeader:
        req = self.req
        e = self.engine
        return MigrationHeader(
            request_id=self.request_id,
            model_id=e.model_id,
            shape=e.kv_shape,
            prompt_token_ids=tuple(int(t) for t in req.prompt_token_ids),
            params=req.sampling_params,
            seed=int(e.runner.seeds.get(self.request_id, 0)),
            priority=req.priority,
            adapter_id=req.adapter_id,
            cache_salt=req.cache_salt,
        )

    def num_full_blocks(self) -> int:
        """Blocks whose every slot holds computed KV (they no longer change)."""
        return self.req.num_computed_tokens // self.engine.kv.block_size

    def pending_blocks(self) -> int:
        """Full blocks filled since the last stage (what :meth:`next_stage` would copy)."""
        self._check_alive()
        return max(0, self.num_full_blocks() - self.blocks_sent)

    def next_stage(self) -> KVStage:
        """Copy the full blocks filled since the last stage (all of them, the first time) while
        the request keeps decoding. Raises MigrationAborted (see the module docstring)."""
        if self.paused or self.done:
            raise RuntimeError("next_stage after stop_and_copy")
        self._check_alive()
        return self._copy(self.blocks_sent, max(self.blocks_sent, self.num_full_blocks()))

    def stop_and_copy(self) -> FinalState:
        """Pause the request (it leaves the batch, keeping its blocks) and copy what is left:
        the remaining full blocks, the partial last block and the token state."""
        if self.paused or self.done:
            raise RuntimeError("stop_and_copy called twice")
        self._check_alive()
        e = self.engine
        req = self.req
        e.scheduler.pause_request(self.request_id)
        self.paused = True
        self.paused_at = time.monotonic()
        n = req.num_computed_tokens
        stage = self._copy(self.blocks_sent, e.kv.blocks_needed(n))
        tr = e._tracked[self.request_id]
        return FinalState(
            stage=stage,
            num_computed_tokens=n,
            output_token_ids=[int(t) for t in req.output_token_ids],
            detok_text=tr.detok.text if tr.detok is not None else "",
            detok_emitted=tr.detok.emitted if tr.detok is not None else 0,
            logprobs=list(tr.logprobs),
        )

    def resume(self) -> None:
        """The destination did not take the request: it continues decoding here (a no-op when
        it was not paused, or is gone meanwhile)."""
        if self.paused and not self.done:
            self.paused = False
            if self.request_id in self.engine.scheduler.paused:
                self.engine.scheduler.resume_request(self.request_id)

    abort_migration = resume

    def commit(self) -> None:
        """The destination runs the request now: retire it here and free its blocks (shared
        prefix blocks keep their other holders). The caller ends the request's output stream
        (``EngineLoop``'s queue) itself, naming the migration."""
        if not self.paused:
            raise RuntimeError("commit before stop_and_copy")
        if self.done:
            return
        self.done = True
        e = self.engine
        if self.request_id in e.scheduler.requests:
            e.scheduler.abort_request(self.request_id)
        e._forget(self.request_id)


class MigrationImport:
    """Destination side of one request's live migration (see the module docstring)."""

    def __init__(self, engine: LLMEngine, header: MigrationHeader) -> None:
        """Check the header against this engine. Raises LayoutMismatchError (other model or KV
        layout), ModelNotFoundError (a LoRA adapter this engine does not serve),
        InvalidRequestError (the id is in use here, or a sliding-window model),
        ResourceExhaustedError (the request's prompt plus max_tokens outgrows this whole pool).
        Allocates nothing."""
        if header.model_id != engine.model_id:
            raise LayoutMismatchError(
                f"request {header.request_id!r} runs model {header.model_id!r}, this engine serves {engine.model_id!r}"
            )
        if header.shape != engine.kv_shape:
            raise LayoutMismatchError(
                f"KV layout {header.shape} does not match this engine's {engine.kv_shape}"
            )
        if engine.kv.sliding_window is not None:
            raise InvalidRequestError("live migration of a sliding-window model is not supported")
        engine.check_adapter(header.adapter_id)  # ModelNotFoundError: not served here
        rid = header.request_id
        if rid in engine._tracked or rid in engine._prefilled or engine.kv.has(rid):
            raise InvalidRequestError(f"request id {rid!r} is already in use on the destination")
        engine._validate_prompt(list(header.prompt_token_ids))
        probe = Request(rid, header.prompt_token_ids, header.params)
        peak = engine.scheduler._peak_blocks(probe)
        if peak > engine.kv.num_blocks:
            # it would preempt itself forever here (the scheduler refuses such a request at
            # admission): the destination is too small for it
            raise ResourceExhaustedError(
                f"request {rid!r} (prompt {len(header.prompt_token_ids)} tokens, max_tokens "
                f"{header.params.max_tokens}) needs up to {peak} KV blocks, the destination has "
                f"{engine.kv.num_blocks} in all"
            )
        self.engine = engine
        self.header = header
        # the prompt's block keys now, not in the stop-and-copy (O(context) hashing)
        self._prompt_hashes: list[BlockHash] = (
            chain_hashes(
                list(header.prompt_token_ids),
                engine.kv.block_size,
                engine.kv.model_id,
                header.adapter_id,
                header.cache_salt,
            )
            if engine.kv.enable_prefix_caching
            else []
        )
        self.blocks_held = 0  # logical blocks written so far
        self.done = False
        self.aborted = False

    @property
    def request_id(self) -> str:
        return self.header.request_id

    def _write(self, stage: KVStage, extra: int = 0) -> None:
        """Allocate blocks for ``stage`` (plus ``extra`` empty ones) and write its KV."""
        if self.done or self.aborted:
            raise RuntimeError("stage after the migration ended")
        if stage.first_block != self.blocks_held:
            raise InvalidRequestError(
                f"stage starts at block {stage.first_block}, the destination holds {self.blocks_held}"
            )
        e = self.engine
        s = e.kv_shape
        want = (s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim)
        if tuple(stage.blocks.shape[1:]) != want:
            raise LayoutMismatchError(f"KV stage of shape {tuple(stage.blocks.shape)} does not fit {want}")
        n = stage.num_blocks
        if n + extra > e.kv.num_free_blocks:
            raise ResourceExhaustedError(
                f"destination has {e.kv.num_free_blocks} free KV blocks, the migration needs {n + extra} more",
                retry_after_s=1.0,
            )
        ids = e.kv.extend_blocks(self.request_id, n + extra)
        if n:
            e.runner.import_blocks(ids[:n], stage.blocks)
        self.blocks_held += n + extra

    def add_stage(self, stage: KVStage) -> None:
        """Allocate and fill the stage's blocks. Raises ResourceExhaustedError when this engine
        is short of blocks (what was allocated before stays held until :meth:`abort`)."""
        self._write(stage)

    def finish(self, final: FinalState) -> str:
        """Write the last stage and insert the request as running; returns its id. The request's
        next step feeds its last output token. Raises ResourceExhaustedError when short of
        blocks (the request then is not inserted; call :meth:`abort`)."""
        e = self.engine
        h = self.header
        n = final.num_computed_tokens
        if not final.output_token_ids or n != len(h.prompt_token_ids) + len(final.output_token_ids) - 1:
            raise InvalidRequestError(
                f"final state of {h.request_id!r} is not decoding: {n} computed tokens for "
                f"{len(h.prompt_token_ids)} prompt and {len(final.output_token_ids)} output tokens"
            )
        need = e.kv.blocks_needed(n)
        if final.stage.first_block + final.stage.num_blocks != need:
            raise InvalidRequestError(
                f"final stage ends at block {final.stage.first_block + final.stage.num_blocks}, "
                f"{n} tokens take {need}"
            )
        # one more block when the next token starts a new one (so the first step cannot stall)
        self._write(final.stage, extra=e.kv.blocks_needed(n + 1) - need)
        req = Request(
            request_id=h.request_id,
            prompt_token_ids=list(h.prompt_token_ids),
            sampling_params=h.params,
            arrival_time=e.clock(),
            priority=h.priority,
            eos_token_ids=e.eos_token_ids,
            adapter_id=h.adapter_id,
            cache_salt=h.cache_salt,
        )
        req.output_token_ids.extend(int(t) for t in final.output_token_ids)
        req.block_hashes = list(self._prompt_hashes)  # the output's blocks are keyed as they fill
        req.num_computed_tokens = n
        req.num_cached_tokens = 0
        if not e._lora_pin(req):  # the last step that can fail: nothing is inserted yet
            raise ResourceExhaustedError(
                f"no LoRA slot is free for adapter {h.adapter_id!r} on the destination now",
                retry_after_s=1.0,
            )
        tr = e._track(req)
        e.runner.seeds[req.request_id] = h.seed  # seeded or not: the same draws as on the source
        now = e.clock()
        tr.metrics.first_token_time = now
        tr.metrics.first_scheduled_time = now
        tr.emitted_tokens = len(req.output_token_ids)
        tr.logprobs = list(final.logprobs)
        if tr.detok is not None:
            tr.detok = IncrementalDetokenizer(
                tr.detok.tokenizer,
                tr.detok.stop,
                text=final.detok_text,
                emitted=final.detok_emitted,
                ids=list(final.output_token_ids),
            )
        e.scheduler.add_running(req)
        e.kv.cache_blocks(req)
        self.done = True
        return req.request_id

    def abort(self) -> None:
        """Free every block allocated for the migration (a no-op once finished: the request is
        the engine's then, aborted like any other)."""
        if self.done or self.aborted:
            return
        self.aborted = True
        self.engine.kv.free(self.request_id)


def migrate_in_process(
    src: LLMEngine, dst: LLMEngine, request_id: str, *, max_stages: int = 1, stop_blocks: int = 0
) -> FinalState:
    """Move a decoding request from ``src`` to ``dst`` in one thread (tests, benchmarks):
    stage 1, up to ``max_stages - 1`` more stages while more than ``stop_blocks`` full blocks are
    pending, then stop-and-copy. On any failure both sides are cleaned (the request resumes on
    ``src`` when it still runs there) and the error is raised; a destination short of blocks
    raises MigrationAborted(DEST_FULL). Returns the final state (the resume index of the output
    stream is ``len(final.output_token_ids)``)."""
    exp = MigrationExport(src, request_id)
    try:
        imp = MigrationImport(dst, exp.header())
    except ResourceExhaustedError as e:
        raise MigrationAborted(AbortReason.DEST_FULL, str(e)) from e
    try:
        imp.add_stage(exp.next_stage())
        for _ in range(max_stages - 1):
            if exp.pending_blocks() <= stop_blocks:
                break
            imp.add_stage(exp.next_stage())
        final = exp.stop_and_copy()
        imp.finish(final)
    except ResourceExhaustedError as e:
        imp.abort()
        exp.resume()
        raise MigrationAborted(AbortReason.DEST_FULL, str(e)) from e
    except BaseException:
        imp.abort()
        exp.resume()
        raise
    exp.commit()
    return final
