"""One handoff request's checks and engine import, shared by the decode worker's two admission
paths (:meth:`decode_worker.service.DecodeServicer._admit_handoff` on the admission thread pool,
:func:`decode_worker.loop_admission.admit_on_loop` on the event loop), so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.convert import handle_from_proto
from kv_store.handle import KVHandle
from pdserve.errors import InvalidRequestError
from pdserve.proto_convert import logprob_from_proto, sampling_from_proto
from pdserve.v1 import worker_pb2


@dataclass(frozen=True)
class Handoff:
    """A checked handoff: its KV handle, request id, sampling and prompt ids."""

    handle: KVHandle
    rid: str
    params: SamplingParams
    ids: list[int]


def check_handoff(req: worker_pb2.DecodeRequest, layout: Any) -> Handoff:
    """The handle of ``req.kv`` checked against this worker's KV ``layout`` and the prompt;
    InvalidRequestError (or the layout's own error) naming what does not match."""
    handle = handle_from_proto(req.kv)
    layout.check_compatible(handle.layout, what="KV handle")
    ids = list(req.prompt_token_ids)
    if len(ids) != handle.num_tokens:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens but the KV handle holds {handle.num_tokens}")
    return Handoff(handle, req.request_id or handle.request_id, sampling_from_proto(req.sampling), ids)


def importer(h: Handoff, req: worker_pb2.DecodeRequest, blocks: Any) -> Callable[[LLMEngine], bool]:
    """What the engine thread runs to import the pulled ``blocks``: True when the first token
    already ended the request (nothing left to decode)."""
    first_lp = logprob_from_proto(req.first_token_logprob) if req.HasField("first_token_logprob") else None

    def add(e: LLMEngine) -> bool:
        e.import_kv(
            h.rid,
            h.ids,
            req.first_token,
            blocks,
            h.params,
            priority=req.priority,
            first_logprob=first_lp,
            adapter_id=req.adapter,
            cache_salt=req.cache_salt,
        )
        return not e.has_request(h.rid)  # the first token already ended it

    return add
