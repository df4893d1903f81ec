"""Whether the router asks for chunk-wise KV streaming (issue #14 part 2), and for which
requests (pure: no gRPC). The legs are :mod:`router.lifecycle.stream_legs`; the workers' side
is :mod:`prefill_worker.kv_stream` / :mod:`decode_worker.stream_puller`."""

from __future__ import annotations

import enum


class KVStreamMode(enum.Enum):
    """``python -m router --kv-stream``: how a streamed handoff's chunks travel, or off."""

    OFF = "off"  # the whole-KV handoff after the prefill (today's default)
    GRPC = "grpc"  # chunk bytes inline in the prefill worker's StreamKV messages
    STORE = "store"  # each chunk on the prefill worker's store node under its own lease
    # each chunk in the prefill worker's direct-transfer outbox, pulled over the workers'
    # torch.distributed group (workers started with --dist-init; others refuse it, naming it)
    DIST = "dist"

    @classmethod
    def parse(cls, value: str) -> KVStreamMode:
        """The mode named ``value``; ValueError naming the valid ones otherwise."""
        try:
            return cls(value.strip().lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"--kv-stream {value!r}: expected one of {valid}") from None


def stream_eligible(mode: KVStreamMode, *, local_prefill: bool, num_candidates: int) -> bool:
    """Whether a single request's prefill streams its KV (the lifecycle's ``STREAMING``):
    streaming is on, the request is prefilled on a prefill worker (a local prefill has no
    handoff) and it is a single sequence (a parallel-sampling group, n > 1 or best_of > 1, is
    streamed by its own relay, :mod:`router.groups`, see :func:`group_streams`). Relayed and
    direct token streams alike: a direct stream's streamed Decode carries its direct grant
    (:meth:`router.lifecycle.direct_legs.DirectLegs.start_streamed_decode`), the decode worker
    assembling the streamed KV and then streaming the tokens to the client. LoRA adapters stream
    (both workers key the chunks with the adapter)."""
    return mode is not KVStreamMode.OFF and not local_prefill and num_candidates <= 1


def group_streams(mode: KVStreamMode, *, local_prefill: bool) -> bool:
    """Whether a parallel-sampling group's prefill streams its KV (every prompt token but the
    last) to its decode worker: streaming is on and the group is prefilled on a prefill worker."""
    return mode is not KVStreamMode.OFF and not local_prefill
