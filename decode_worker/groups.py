"""The decode worker's part of a parallel-sampling request (``SamplingParams.n > 1`` or
``best_of > 1``): admitting a group handoff and streaming its choices.

Handoff (``DecodeRequest.prompt_tail_pending``): the KV covers every prompt token but the last;
the engine adopts it once (``LLMEngine.import_kv_group``) and forks the choices over those
blocks (shared by reference count, copy-on-write of the partial block). A ``local_prefill``
group runs whole here (``LLMEngine.add_request``, which prefills ``prompt[:-1]`` once). A group
whose KV is streamed (``kv_stream_address``) is admitted by
:func:`decode_worker.stream_puller.admit_streamed_handoff`, with the same checks and the same
``import_kv_group``.

Stream: each message holds one choice's tokens and carries its ``choice_index``; a choice's
last message has its finish; the stream ends after ``n`` finishes. Cancelling the stream aborts
the request id, which frees every choice's blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.engine_loop import OutputItem
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_store.convert import handle_from_proto
from pdserve.errors import InvalidRequestError, ResourceExhaustedError
from pdserve.proto_convert import finish_to_proto, logprob_to_proto, sampling_from_proto
from pdserve.v1 import worker_pb2


def num_choices(req: worker_pb2.DecodeRequest) -> int:
    """Finished outputs the request's stream waits for: its ``n`` (1 unless parallel sampling)."""
    return req.sampling.n or 1


def is_group(req: worker_pb2.DecodeRequest) -> bool:
    s = req.sampling
    return (s.n or 1) > 1 or (s.HasField("best_of") and s.best_of > 1)


def check_group_handoff(req: worker_pb2.DecodeRequest, params: SamplingParams) -> None:
    """Refuse (InvalidRequestError, naming the field) a ``prompt_tail_pending`` handoff that is not
    a well-formed group, and a group handoff without it (its KV would be read as the whole prompt's)."""
    if req.prompt_tail_pending and params.num_candidates < 2:
        raise InvalidRequestError(
            "prompt_tail_pending is for a parallel-sampling request (n > 1 or best_of > 1)"
        )
    if not req.prompt_tail_pending and params.num_candidates > 1 and not req.local_prefill:
        raise InvalidRequestError(
            f"n={params.n}, best_of={params.best_of} handed off needs prompt_tail_pending (the prefill of "
            "a group leaves the last prompt token to the choices)"
        )
    if req.prompt_tail_pending:
        if req.first_token or req.HasField("first_token_logprob"):
            raise InvalidRequestError("prompt_tail_pending: the prefill sampled nothing; send no first_token")
        if req.resume_token_ids:
            raise InvalidRequestError("prompt_tail_pending cannot resume: resume each choice alone with n=1")
        if req.adapter:
            raise InvalidRequestError(f"n={params.n} is not supported with a LoRA adapter yet: send n=1")


def _no_group_room(svc: Any, num_tokens: int, choices: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"decode worker {svc.state.config.worker_id} has no free KV blocks for {num_tokens} "
        f"prompt tokens and {choices} choices",
        retry_after_s=1.0,
    )


def wait_for_group_blocks(
    svc: Any, ctx: Any, num_tokens: int, choices: int, deadline: float | None = None
) -> None:
    """Wait (until ``deadline``, default the admission deadline of a single request) until the
    engine can adopt a group of ``choices`` over ``num_tokens`` handed-off prompt tokens;
    ResourceExhaustedError after; InvalidRequestError at once when the whole pool could never hold
    the group's start (``LLMEngine.check_group_fits``). ``svc``: the decode servicer."""

    def room(e: LLMEngine) -> bool:
        if e.can_admit_group(num_tokens, choices):
            return True
        e.check_group_fits(num_tokens, choices)  # no room now: is there ever?
        return False

    svc._wait_until(
        room,
        lambda: _no_group_room(svc, num_tokens, choices),
        ctx,
        svc._admission_deadline(ctx) if deadline is None else deadline,
    )


def add_group_when_room(
    svc: Any,
    rid: str,
    add: Callable[[LLMEngine], Any],
    out: Any,
    ctx: Any,
    num_tokens: int,
    choices: int,
    n: int,
) -> Any:
    """``svc._add`` of a group's import ``add`` (``LLMEngine.import_kv_group``, which refuses with
    ResourceExhaustedError and takes nothing when the blocks are not there): room was there
    before the pull, but another request may have taken the blocks since, so a refused import
    waits for room (:func:`wait_for_group_blocks`) and tries again, up to the admission
    deadline, then fails with the same error as the wait (``svc._retry_add``). ``n``: the
    request's choices (parallel sampling's finished outputs); ``choices``: the candidates the
    engine forks."""
    return svc._retry_add(
        lambda: svc._add(rid, add, out, n),
        lambda deadline: wait_for_group_blocks(svc, ctx, num_tokens, choices, deadline),
        lambda: _no_group_room(svc, num_tokens, choices),
        ctx,
    )


def admit_group_handoff(
    svc: Any, req: worker_pb2.DecodeRequest, ctx: Any, out: Any
) -> tuple[str, Any, float]:
    """Wait for blocks (the admission timeout, as a single request), pull the handed-off KV
    (``svc._pull``: the lease is released), import it as a group. Returns (request id, output
    queue, pull seconds). ``svc``: the :class:`decode_worker.service.DecodeServicer`."""
    if not req.HasField("kv"):
        raise InvalidRequestError("Decode needs the KVHandle returned by Prefill (or local_prefill)")
    handle = handle_from_proto(req.kv)
    svc.state.layout.check_compatible(handle.layout, what="KV handle")
    rid = req.request_id or handle.request_id
    params = sampling_from_proto(req.sampling)
    check_group_handoff(req, params)
    ids = list(req.prompt_token_ids)
    if len(ids) - 1 != handle.num_tokens:
        raise InvalidRequestError(
            f"prompt has {len(ids)} tokens; a group's KV handle must hold all but the last, it holds "
            f"{handle.num_tokens}"
        )
    wait_for_group_blocks(svc, ctx, len(ids) - 1, params.num_candidates)
    blocks, pull_s = svc._pull(handle)

    def add(e: LLMEngine) -> None:
        e.import_kv_group(rid, ids, blocks, params, priority=req.priority, cache_salt=req.cache_salt)

    n = len(ids) - 1
    return (
        rid,
        add_group_when_room(svc, rid, add, out, ctx, n, params.num_candidates, num_choices(req)),
        pull_s,
    )


def group_messages(
    rid: str, batch: list[OutputItem], *, with_text: bool
) -> tuple[list[worker_pb2.DecodeResponse], BaseException | None]:
    """One DecodeResponse per choice present in ``batch`` (in order of first appearance), each
    with that choice's tokens, logprobs, text delta (``with_text``) and, when it finished, its
    finish; and the failure that ended the batch, if any."""
    failure = next((i for i in batch if isinstance(i, BaseException)), None)
    by_choice: dict[int, list[RequestOutput]] = {}
    for o in batch:
        if isinstance(o, BaseException) or not (o.new_token_ids or o.finished):
            continue
        by_choice.setdefault(o.choice_index, []).append(o)
    msgs = []
    for ci, outs in by_choice.items():
        m = worker_pb2.DecodeResponse(
            request_id=rid,
            token_ids=[t for o in outs for t in o.new_token_ids],
            logprobs=[logprob_to_proto(lp) for o in outs for lp in o.logprobs],
            choice_index=ci,
        )
        if with_text:
            m.text = "".join(o.text_delta for o in outs)
            m.has_text = True
        last = outs[-1]
        if last.finished:
            m.finish.reason = finish_to_proto(last.finish_reason)
            if last.stop_reason is not None:
                m.finish.stop = str(last.stop_reason)
        msgs.append(m)
    return msgs, failure


async def stream_group(
    out: Any,
    rid: str,
    choices: int,
    *,
    with_text: bool,
    count_finished: Callable[[], None],
    first_message: Callable[[worker_pb2.DecodeResponse, list[OutputItem]], None],
) -> AsyncIterator[worker_pb2.DecodeResponse]:
    """The messages of a group from its output queue ``out`` until ``choices`` choices finished
    (``count_finished`` then, once) or a failure (raised). ``first_message(msg, batch)`` fills
    the stream's first message (the KV pull time, the cached tokens)."""
    left, first = choices, True
    while left:
        batch = [await out.get()]
        while not isinstance(batch[-1], BaseException):
            try:
                batch.append(out.get_nowait())
            except asyncio.QueueEmpty:
                break
        msgs, failure = group_messages(rid, batch, with_text=with_text)
        for m in msgs:
            if first:
                first_message(m, batch)
                first = False
            if m.HasField("finish"):
                left -= 1
                if not left:
                    count_finished()
            yield m
        if failure is not None:
            raise failure
