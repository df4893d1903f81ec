"""A cache of ``KVPeer`` stubs of prefill workers, one gRPC channel per address (I/O seam)."""

from __future__ import annotations

import threading

import grpc

from pdserve.limits import grpc_options
from pdserve.v1 import worker_pb2_grpc


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
                ch = self._channels[address] = grpc.insecure_channel(address, options=grpc_options())
                stub = self._stubs[address] = worker_pb2_grpc.KVPeerStub(ch)
            return stub

    def close(self) -> None:
        with self._guard:
            chans = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for ch in chans:
            ch.close()
