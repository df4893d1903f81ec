"""One DecodeResponse from a batch of engine outputs (shared by Decode and ResumeStream)."""

from __future__ import annotations

from collections.abc import Callable

from engine.engine_loop import OutputItem
from pdserve.proto_convert import finish_to_proto, logprob_to_proto
from pdserve.v1 import worker_pb2


def decode_message(
    rid: str, batch: list[OutputItem], count_finished: Callable[[], None], *, with_text: bool = False
) -> tuple[worker_pb2.DecodeResponse | None, BaseException | None]:
    """One DecodeResponse for the engine outputs ``batch`` (every token that was ready), and the
    failure that ended the batch, if any. None when the batch holds no token and no finish.
    ``with_text``: carry the engine's text delta (``has_text``), so the router relays it instead of
    detokenizing again. ``count_finished`` is called once when the batch finishes the request."""
    failure = next((i for i in batch if isinstance(i, BaseException)), None)
    outs = [i for i in batch if not isinstance(i, BaseException)]
    streamed = [o for o in outs if o.new_token_ids or o.finished]
    if not streamed:
        return None, failure
    msg = worker_pb2.DecodeResponse(
        request_id=rid,
        token_ids=[t for o in streamed for t in o.new_token_ids],
        logprobs=[logprob_to_proto(lp) for o in streamed for lp in o.logprobs],
    )
    if with_text:
        msg.text = "".join(o.text_delta for o in streamed)
        msg.has_text = True
    last = streamed[-1]
    if last.finished:
        count_finished()
        msg.finish.reason = finish_to_proto(last.finish_reason)
        if last.stop_reason is not None:
            msg.finish.stop = str(last.stop_reason)
    return msg, failure
