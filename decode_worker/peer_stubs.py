"""A cache of ``KVPeer`` stubs of prefill workers, one gRPC channel per address, and the typed
error of a failed ``KVPeer`` call (I/O seam)."""

from __future__ import annotations

import threading

import grpc

from kv_store.handle import KVHandle
from pdserve.errors import PdserveError, RequestNotFoundError
from pdserve.security import internal_channel
from pdserve.status import error_from_rpc_error
from pdserve.v1 import worker_pb2_grpc


def peer_error(e: grpc.RpcError, rpc: str, handle: KVHandle, where: str) -> PdserveError:
    """The typed error of ``rpc`` (``PushKV`` / ``SpillKV``) failing for ``handle`` at ``where``:
    NOT_FOUND (the outbox entry is gone) as a RequestNotFoundError naming the likely cause,
    anything else as its own type with the call named."""
    err: PdserveError = error_from_rpc_error(e)
    if e.code() == grpc.StatusCode.NOT_FOUND:
        return RequestNotFoundError(
            f"the KV of request {handle.request_id!r} is no longer held by {where}: its outbox "
            f"entry expired (lease TTL) or was evicted before this decode worker pulled it; "
            f"submit the request again ({err.message})"
        )
    return type(err)(f"{rpc} to {where} for {handle.request_id!r} failed: {err.message}")


class PeerStubs:
    """``stub(address)``: the ``KVPeer`` stub of the prefill worker at ``address`` (a channel is
    opened on first use and kept); :meth:`close` closes every channel. Thread-safe."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.KVPeerStub] = {}

    def stub(self, address: str) -> worker_pb2_grpc.KVPeerStub:
        with self._guard:
            stub = self._stubs.get(address)
            if stub is None:
                ch = self._channels[address] = internal_channel(address)
                stub = self._stubs[address] = worker_pb2_grpc.KVPeerStub(ch)
            return stub

    def close(self) -> None:
        with self._guard:
            chans = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for ch in chans:
            ch.close()
