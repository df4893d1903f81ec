"""The router's side of live migration (Llumnix): move one running request from a source decode
worker to a destination decode worker, then follow its token stream there.

Two calls (contracts in ``proto/pdserve/v1/worker.proto``):

* :func:`migrate` asks the source (``Worker.MigrateOut``); the workers copy the KV between
  themselves (the router carries no KV) and the answer says what happened
  (:class:`MigrationResult`). On ``MIGRATED`` the source's Decode stream of the request ends with
  status ABORTED ("migrated ..."); every other result leaves the request where it was (running
  on the source unless it finished or was cancelled there) and nothing allocated anywhere.
* :func:`open_resumed_stream` opens the destination's stream of the migrated request from output
  token index ``k`` (``Worker.ResumeStream``): the number of output tokens the router already
  relayed (at most ``resume_token_index``). Tokens from ``k`` on come in order, no gap, no
  duplicate, then the finish; messages are ``DecodeResponse`` with ``has_text`` false (the router
  renders the text of the resumed leg itself). The stream must be opened within the destination's
  attach timeout (30 s by default), else the request is aborted there.

:class:`GrpcMigrator` keeps one channel per worker address and offers both as methods.
"""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdserve.limits import grpc_options
from pdserve.migration_result import MigrationResult
from pdserve.security import TOKEN_METADATA_KEY, current
from pdserve.status import raise_from_rpc_error
from pdserve.v1 import worker_pb2, worker_pb2_grpc


def _aio_channel(address: str) -> grpc.aio.Channel:
    """An internal ``grpc.aio`` channel (TLS and this process's client certificate when TLS is
    on; the cluster token goes with each call: :func:`_metadata`)."""
    cfg = current()
    opts = [*grpc_options(), *cfg.channel_options()]
    if cfg.tls_on:
        return grpc.aio.secure_channel(address, cfg.channel_credentials(), options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


def _metadata() -> tuple[tuple[str, str], ...] | None:
    token = current().cluster_token
    return ((TOKEN_METADATA_KEY, token),) if token else None


class MigrationTransport(enum.Enum):
    """How the KV blocks travel between the two workers (worker.proto ``MigrationTransport``)."""

    GRPC = worker_pb2.MIGRATION_TRANSPORT_GRPC  # in the worker-to-worker stream
    STORE = worker_pb2.MIGRATION_TRANSPORT_STORE  # through the source's KV store node (shm on one host)
    # over the workers' torch.distributed process group (gloo | NCCL; workers with --dist-init)
    DIST = worker_pb2.MIGRATION_TRANSPORT_DIST

    @classmethod
    def parse(cls, value: str) -> MigrationTransport:
        """``grpc`` | ``store`` | ``dist`` (the router's ``--migration-transport``); anything else
        is refused naming the choices."""
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise ValueError(
                f"migration transport must be one of {', '.join(m.name.lower() for m in cls)}, got {value!r}"
            ) from None


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migrate` returns. ``resume_token_index``: on MIGRATED, the output tokens the
    request had when it left the source (its next token on the destination has this index); 0
    otherwise. ``downtime_s``: the request's pause on the source until the destination ran it
    (as the source measured it). ``message``: why, for an abort."""

    result: MigrationResult
    resume_token_index: int = 0
    num_stages: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0
    downtime_s: float = 0.0
    total_s: float = 0.0
    message: str = ""


def report_from_proto(m: worker_pb2.MigrateOutResponse) -> MigrationReport:
    try:
        result = MigrationResult(m.result)
    except ValueError:
        result = MigrationResult.ABORTED_PEER_DIED  # an unknown answer: assume nothing moved
    return MigrationReport(
        result=result,
        resume_token_index=m.resume_token_index if result.migrated else 0,
        num_stages=m.num_stages,
        blocks_copied=m.blocks_copied,
        bytes_copied=m.bytes_copied,
        downtime_s=m.downtime_s,
        total_s=m.total_s,
        message=m.message,
    )


async def migrate(
    source: worker_pb2_grpc.WorkerStub,
    request_id: str,
    dest_address: str,
    *,
    max_stages: int = 4,
    stop_blocks: int = 0,
    timeout_s: float = 30.0,
    transport: MigrationTransport = MigrationTransport.GRPC,
) -> MigrationReport:
    """Move ``request_id`` from the decode worker behind ``source`` (a ``grpc.aio`` stub) to the
    decode worker at ``dest_address``. ``max_stages``: stages copied while it decodes, at most;
    ``stop_blocks``: go to the stop-and-copy once at most this many full blocks are left;
    ``timeout_s``: the whole migration; ``transport``: how the KV travels (STORE needs a source
    with a KV store publisher, else INVALID_ARGUMENT). A source that cannot be reached (or fails the call)
    answers ABORTED_PEER_DIED; INVALID_ARGUMENT (the request is not decoding there yet, or a bad
    address) is raised as the typed error. Cancelling the coroutine cancels the call: the
    workers give the migration up unless the destination already runs the request."""
    if max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    t0 = time.monotonic()
    try:
        resp = await source.MigrateOut(
            worker_pb2.MigrateOutRequest(
                request_id=request_id,
                dest_address=dest_address,
                max_stages=max_stages,
                stop_blocks=stop_blocks,
                timeout_s=timeout_s,
                transport=transport.value,
            ),
            timeout=timeout_s + 5.0,
            metadata=_metadata(),
        )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise_from_rpc_error(e)
        return MigrationReport(
            MigrationResult.ABORTED_PEER_DIED,
            total_s=time.monotonic() - t0,
            message=f"MigrateOut failed: {e.code().name if e.code() else ''} {e.details()}",
        )
    return report_from_proto(resp)


def open_resumed_stream(
    dest: worker_pb2_grpc.WorkerStub,
    request_id: str,
    start_index: int,
    timeout_s: float | None = None,
    direct: worker_pb2.ResumeStreamRequest | None = None,
) -> AsyncIterator[worker_pb2.DecodeResponse]:
    """The destination's token stream of a migrated request from output token index
    ``start_index`` (the tokens the router already relayed; <= ``resume_token_index``). The
    returned call is an async iterator of ``DecodeResponse``; cancelling it aborts the request.
    ``direct``: a ResumeStreamRequest carrying the direct-stream fields (``direct``,
    ``direct_text_chars``, ``direct_stop``): the tokens go to the client (worker.proto)."""
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    req = worker_pb2.ResumeStreamRequest(request_id=request_id, start_index=start_index)
    if direct is not None:
        req.MergeFrom(direct)
    return dest.ResumeStream(req, timeout=timeout_s, metadata=_metadata())


class GrpcMigrator:
    """:func:`migrate` and :func:`open_resumed_stream` by worker address, one ``grpc.aio``
    channel per address (opened on first use, closed by :meth:`close`). Use from one event loop."""

    def __init__(
        self,
        max_stages: int = 4,
        stop_blocks: int = 0,
        timeout_s: float = 30.0,
        transport: MigrationTransport = MigrationTransport.GRPC,
    ) -> None:
        self.transport = transport
        self.max_stages = max_stages
        self.stop_blocks = stop_blocks
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = _aio_channel(address)
        return worker_pb2_grpc.WorkerStub(ch)

    async def migrate(self, request_id: str, source_address: str, dest_address: str) -> MigrationReport:
        return await migrate(
            self.stub(source_address),
            request_id,
            dest_address,
            max_stages=self.max_stages,
            stop_blocks=self.stop_blocks,
            timeout_s=self.timeout_s,
            transport=self.transport,
        )

    def resume(
        self,
        request_id: str,
        dest_address: str,
        start_index: int,
        direct: worker_pb2.ResumeStreamRequest | None = None,
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        return open_resumed_stream(self.stub(dest_address), request_id, start_index, direct=direct)

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            await ch.close()
