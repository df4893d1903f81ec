"""Converters between pdserve.v1 messages and engine types shared by router, workers and client.

Protobuf types stay at service edges: services call these, nothing deeper sees a message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from engine.outputs import TokenLogprob
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from pdserve.v1 import common_pb2

_FINISH_TO_PROTO = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    m = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        stop_token_ids=list(p.stop_token_ids),
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        seed_position_offset=p.seed_position_offset,
        n=p.n,
    )
    if p.best_of is not None:
        m.best_of = p.best_of
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def sampling_from_proto(m: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams defaults; values are validated there
    (``n`` 0 means 1)."""
    kw: dict = {
        "top_k": m.top_k,
        "min_p": m.min_p,
        "stop_token_ids": tuple(m.stop_token_ids),
        "stop": tuple(m.stop),
        "ignore_eos": m.ignore_eos,
        "min_tokens": m.min_tokens,
        "seed_position_offset": m.seed_position_offset,
        "n": m.n or 1,
    }
    for name in ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "logprobs", "best_of"):
        if m.HasField(name):
            kw[name] = getattr(m, name)
    return SamplingParams(**kw)


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(m: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top_logprobs])


def name_logprob_tokens(lps: Iterable[common_pb2.TokenLogprob], token_bytes: Callable[[int], bytes]) -> None:
    """Fill ``token_bytes`` and ``token`` (those bytes as UTF-8, U+FFFD for an incomplete
    character) of every sampled token and alternative in ``lps``, in place. ``token_bytes``: the
    raw bytes of one token id (:meth:`engine.tokenizer.Tokenizer.token_bytes`)."""
    for lp in lps:
        b = token_bytes(lp.token_id)
        lp.token_bytes, lp.token = b, b.decode("utf-8", errors="replace")
        for t in lp.top_logprobs:
            tb = token_bytes(t.token_id)
            t.token_bytes, t.token = tb, tb.decode("utf-8", errors="replace")


def finish_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_TO_PROTO.get(reason, common_pb2.FINISH_REASON_STOP) if reason else 0


def finish_from_proto(v: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(v)
