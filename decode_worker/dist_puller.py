"""Decode side of the direct KV handoff over torch.distributed (gloo on CPU, NCCL on GPU).

:class:`DistPuller` is a :class:`~decode_worker.puller.KVPuller` for a worker that joined the
workers' process group (``--dist-init``). A direct handle (``KVHandle.is_direct``: the prefill
worker kept the blocks in its outbox, :mod:`prefill_worker.dist_outbox`) is pulled like this,
under a lock per source rank (so that the P2P transfers between one pair of ranks never
interleave):

1. call ``KVPeer.PushKV(request_id, my rank)`` on the prefill worker at ``handle.dist_address``
   (a server stream);
2. on its first message (ACCEPTED: the prefill worker took the entry and is sending), receive
   the transfer from ``handle.dist_rank`` into a tensor sized from the handle
   (:meth:`kv_store.dist_transport.DistBlockReceiver.recv_into`);
3. read its second message (DONE) and return the blocks.

Nothing is posted to the process group before ACCEPTED, so a refused push (NOT_FOUND: the
outbox entry expired, was evicted or already pushed) leaves the pair in step; it raises
:class:`~pdserve.errors.RequestNotFoundError` with a message naming the cause (the router
returns it to the client, which may submit the request again). A transfer of another request
arriving first (left over by an earlier pull that gave up after ACCEPTED) is received, counted in
``stale_discarded`` and dropped, up to ``max_stale`` times.

Every other handle goes to the wrapped ``fallback`` puller (the store path), and so do direct
handles once this worker's process group failed to form: a
:class:`~decode_worker.spill_puller.SpillPuller` fallback then has the prefill worker spill them
to its store. ``release`` of a direct handle is passed to the fallback (a no-op unless it spilled
it): the push removed the outbox entry, and one never pulled expires there.
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
from kv_store.dist_transport import DistBlockReceiver, TransferHeader
from kv_store.handle import KVHandle
from pdserve.errors import (
    InvalidRequestError,
    LayoutMismatchError,
    UnavailableError,
)
from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2
from prefill_worker.dist_outbox import PeerLocks

log = logging.getLogger(__name__)


class PeerGroup(Protocol):
    """This process's place in the workers' process group (``pdserve.worker_main.DistGroup``)."""

    rank: int
    world_size: int

    def wait_ready(self, timeout_s: float) -> torch.device:
        """Block until the group is formed; UnavailableError when it failed or took too long."""
        ...

    @property
    def failed(self) -> bool:
        """True once forming the group failed (it never becomes usable)."""
        ...


class BlockReceiver(Protocol):
    def recv_into(self, src: int, out: torch.Tensor) -> TransferHeader: ...


class KVPeerStub(Protocol):
    """What :class:`DistPuller` calls: ``worker_pb2_grpc.KVPeerStub`` or a fake."""

    def PushKV(self, request: worker_pb2.PushKVRequest, timeout: float | None = None) -> Any: ...


class DistPuller:
    """:class:`~decode_worker.puller.KVPuller` for direct handles; others go to ``fallback``.

    ``stub_for(address)`` returns the KVPeer stub of a prefill worker (default: a cached gRPC
    channel per address); ``receiver`` defaults to a
    :class:`~kv_store.dist_transport.DistBlockReceiver` on the group's device. ``timeout_s``
    bounds the wait for the group and the PushKV call. ``locks``: the per-source-rank locks a pull
    holds (shared with this worker's KVPeer service when it also sends, see
    :class:`~prefill_worker.dist_outbox.PeerLocks`). Counters: ``direct_pulls``,
    ``direct_failures``, ``stale_discarded``.
    """

    def __init__(
        self,
        group: PeerGroup,
        fallback: KVPuller,
        stub_for: Callable[[str], KVPeerStub] | None = None,
        receiver: BlockReceiver | None = None,
        timeout_s: float = 120.0,
        max_stale: int = 4,
        locks: PeerLocks | None = None,
    ) -> None:
        self.group = group
        self.fallback = fallback
        self._stubs = PeerStubs() if stub_for is None else None
        self._stub_for = stub_for or self._stubs.stub  # type: ignore[union-attr]
        self._receiver = receiver
        self.timeout_s = timeout_s
        self.max_stale = max_stale
        self._guard = threading.Lock()
        self.locks = locks if locks is not None else PeerLocks()
        self.direct_pulls = 0
        self.direct_failures = 0
        self.stale_discarded = 0

    @property
    def transport(self) -> Any:
        """The fallback puller's block transport (the decode service reads its counters)."""
        return getattr(self.fallback, "transport", None)

    def _count(self, name: str) -> None:
        with self._guard:
            setattr(self, name, getattr(self, name) + 1)

    def on_loop(self, handle: KVHandle) -> Any:
        """The store puller that would pull ``handle`` when an event loop may run it itself
        (:meth:`decode_worker.puller.StorePuller.on_loop`); None otherwise (a direct handle)."""
        if handle.is_direct:
            return None
        inner = getattr(self.fallback, "on_loop", None)
        return inner(handle) if inner is not None else None

    def pull(self, handle: KVHandle) -> torch.Tensor:
        """``[n_blocks, num_layers, 2, block_size, kvh, hd]`` in handle order (on the group's
        device for a direct handle: CPU with gloo, CUDA with NCCL)."""
        if not handle.is_direct or self.group.failed:
            return self.fallback.pull(handle)
        try:
            out = self._pull_direct(handle)
        except Exception:
            self._count("direct_failures")
            raise
        self._count("direct_pulls")
        return out

    def release(self, handle: KVHandle) -> None:
        """The fallback's release (for a direct handle pulled over the group it has nothing to
        release: no lease; see module docstring)."""
        self.fallback.release(handle)

    def _pull_direct(self, handle: KVHandle) -> torch.Tensor:
        src, me = handle.dist_rank, self.group.rank
        if not (0 <= src < self.group.world_size) or src == me:
            raise InvalidRequestError(
                f"KV handle of {handle.request_id!r} names rank {src}, not another rank of this decode "
                f"worker's process group (world size {self.group.world_size}, this worker is rank {me})"
            )
        device = self.group.wait_ready(self.timeout_s)
        receiver = self._receiver
        if receiver is None:
            receiver = self._receiver = DistBlockReceiver(device)
        layout = handle.layout
        n = len(handle.block_hashes)
        out = torch.empty((n, *layout.block_shape), dtype=getattr(torch, layout.dtype), device=device)
        where = f"prefill worker {handle.dist_address} (rank {src})"
        with self.locks.lock_for(src):
            call = self._stub_for(handle.dist_address).PushKV(
                worker_pb2.PushKVRequest(request_id=handle.request_id, dst_rank=me), timeout=self.timeout_s
            )
            try:
                first = self._next(call, handle, where)
                if first.phase != worker_pb2.PUSH_KV_PHASE_ACCEPTED:
                    raise UnavailableError(f"PushKV to {where}: expected ACCEPTED, got phase {first.phase}")
                self._receive(receiver, src, out, handle)
                last = self._next(call, handle, where)
                if last.phase != worker_pb2.PUSH_KV_PHASE_DONE:
                    raise UnavailableError(f"PushKV to {where}: expected DONE, got phase {last.phase}")
            except BaseException:
                cancel = getattr(call, "cancel", None)
                if cancel is not None:
                    cancel()
                raise
        return out

    def _receive(self, receiver: BlockReceiver, src: int, out: torch.Tensor, handle: KVHandle) -> None:
        """Receive this handle's transfer into ``out``, dropping stale transfers of other requests."""
        n = out.shape[0]
        for _ in range(self.max_stale + 1):
            header = receiver.recv_into(src, out)
            if header.request_id == handle.request_id:
                if header.n_blocks != n:
                    raise LayoutMismatchError(
                        f"direct transfer of {handle.request_id!r} from rank {src} carried {header.n_blocks} "
                        f"blocks; its KV handle names {n}"
                    )
                return
            self._count("stale_discarded")
            log_event(
                log,
                "stale direct transfer discarded",
                logging.WARNING,
                request_id=handle.request_id,
                stale_request_id=header.request_id,
                src_rank=src,
            )
        raise UnavailableError(
            f"direct transfer from rank {src}: {self.max_stale + 1} transfers of other requests arrived "
            f"instead of {handle.request_id!r}; the pair of ranks is out of step (restart the workers)"
        )

    @staticmethod
    def _next(call: Any, handle: KVHandle, where: str) -> worker_pb2.PushKVResponse:
        """The next message of a PushKV stream, its failure as a typed error naming the cause."""
        try:
            return next(call)
        except StopIteration:
            raise UnavailableError(f"PushKV to {where} ended early for {handle.request_id!r}") from None
        except grpc.RpcError as e:
            raise peer_error(e, "PushKV", handle, where) from None

    def close(self) -> None:
        """Close the gRPC channels this puller (and its fallback) opened."""
        if self._stubs is not None:
            self._stubs.close()
        close = getattr(self.fallback, "close", None)
        if close is not None:
            close()
