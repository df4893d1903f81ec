"""Direct KV handles for a decode worker outside the workers' process group.

A prefill worker of the direct handoff (:mod:`prefill_worker.dist_outbox`) keeps a request's
blocks in its outbox and returns a direct handle, whichever decode worker the router picks. A
decode worker that is not in the process group (it joined the cluster after the group formed:
``pdserve scale``; it was restarted; its group failed to form) cannot receive over the group, so
:class:`SpillPuller` asks the prefill worker to spill the entry to its store node
(``KVPeer.SpillKV``) and pulls the returned store handle through the wrapped ``fallback``
(:class:`~decode_worker.puller.StorePuller`): one extra hop, nothing lost.

Contract: every non-direct handle goes to ``fallback`` unchanged. For a direct handle, ``pull``
raises :class:`~pdserve.errors.RequestNotFoundError` when the outbox entry is gone (expired,
evicted, already pushed), other :class:`~pdserve.errors.PdserveError` subclasses for a failed
call; ``release`` (always called after ``pull``, also on failure) releases the store lease the
spill created, once; releasing a direct handle that was never spilled does nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import torch

from decode_worker.peer_stubs import PeerStubs, peer_error
from decode_worker.puller import KVPuller
from kv_store.convert import handle_from_proto
from kv_store.handle import KVHandle
from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2

log = logging.getLogger(__name__)


class SpillStub(Protocol):
    """What :class:`SpillPuller` calls: ``worker_pb2_grpc.KVPeerStub`` or a fake."""

    def SpillKV(self, request: worker_pb2.SpillKVRequest, timeout: float | None = None) -> Any: ...


class SpillPuller:
    """:class:`~decode_worker.puller.KVPuller`: direct handles through ``KVPeer.SpillKV`` and the
    store, others through ``fallback`` (see module docstring). ``stub_for(address)`` defaults to
    a cached gRPC stub per prefill worker. Counter: ``spills`` (direct handles pulled this way)."""

    def __init__(
        self,
        fallback: KVPuller,
        stub_for: Callable[[str], SpillStub] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.fallback = fallback
        self._stubs = PeerStubs() if stub_for is None else None
        self._stub_for = stub_for or self._stubs.stub  # type: ignore[union-attr]
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._spilled: dict[tuple[str, str], KVHandle] = {}  # (request id, prefill address) -> store handle
        self.spills = 0

    @property
    def transport(self) -> Any:
        """The fallback puller's block transport (the decode service reads its counters)."""
        return getattr(self.fallback, "transport", None)

    def on_loop(self, handle: KVHandle) -> Any:
        """The store puller that would pull ``handle`` when an event loop may run it itself
        (:meth:`decode_worker.puller.StorePuller.on_loop`); None otherwise (a direct handle)."""
        if handle.is_direct:
            return None
        inner = getattr(self.fallback, "on_loop", None)
        return inner(handle) if inner is not None else None

    def pull(self, handle: KVHandle) -> torch.Tensor:
        if not handle.is_direct:
            return self.fallback.pull(handle)
        stored = self._spill(handle)
        with self._lock:
            self._spilled[(handle.request_id, handle.dist_address)] = stored
            self.spills += 1
        return self.fallback.pull(stored)

    def release(self, handle: KVHandle) -> None:
        if not handle.is_direct:
            self.fallback.release(handle)
            return
        with self._lock:
            stored = self._spilled.pop((handle.request_id, handle.dist_address), None)
        if stored is not None:
            self.fallback.release(stored)

    def _spill(self, handle: KVHandle) -> KVHandle:
        where = f"prefill worker {handle.dist_address} (rank {handle.dist_rank})"
        try:
            res = self._stub_for(handle.dist_address).SpillKV(
                worker_pb2.SpillKVRequest(request_id=handle.request_id), timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            raise peer_error(e, "SpillKV", handle, where) from None
        stored = handle_from_proto(res.handle)
        log_event(log, "direct handle spilled to store", request_id=handle.request_id, source=where)
        return stored

    def close(self) -> None:
        """Close the gRPC channels this puller (and its fallback) opened."""
        if self._stubs is not None:
            self._stubs.close()
        close = getattr(self.fallback, "close", None)
        if close is not None:
            close()
