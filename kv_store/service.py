"""gRPC edge of a store node: the KVStore servicer and :func:`serve`.

Servicer methods validate every request and raise pdserve errors; :func:`pdserve.status.add_servicer`
turns those (and undecodable messages) into statuses, so a bad request never takes the server
down. The server also serves gRPC health (``grpc.health.v1``; "" and "pdserve.v1.KVStore") and
reflection. Transfers (Put, Get, Lease for shm reads, and the zero-rpc shm reads of a leased
Put's slots that a Release reports in ``shm_read_blocks``) and lookups are counted in a
:class:`pdserve.metrics.StoreMetrics`; a ``pdserve-request-id`` call metadata is logged with puts
and releases.

Access (:mod:`kv_store.auth`): every KVStore call asks the servicer's :class:`~kv_store.auth.Authorizer`
first; a caller that is not a cluster member gets UNAUTHENTICATED (counted in
``KVStoreStats.denied_calls``) before anything is read or changed. Health and reflection stay open.
Integrity (:mod:`kv_store.checksum`): Put requires each block's checksum and verifies the bytes;
Get sends each block's stored checksum; Lease returns them. Leases are charged to an owner:
metadata ``x-pdserve-lease-owner``, else the caller's identity.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from kv_store import convert
from kv_store.auth import (
    LEASE_OWNER_METADATA_KEY,
    Authorizer,
    TokenAuthorizer,
    authorizer_for,
    check_owner,
    cluster_token_from_env,
    metadata_value,
)
from kv_store.index import KVIndex
from kv_store.node import PutTicket
from kv_store.store import BlockStore, PutResult, StoreConfig, check_hash_list
from kv_store.wire import encode_chunk
from pdserve.errors import InvalidRequestError, UnauthenticatedError
from pdserve.keepalive import KEEPALIVE
from pdserve.limits import MAX_CHUNK_BYTES, grpc_options
from pdserve.metrics import StoreMetrics
from pdserve.security import SecurityConfig, bind, server_security
from pdserve.status import add_servicer
from pdserve.tracing import log_event, request_id_from_context, request_scope
from pdserve.v1 import common_pb2, kv_store_pb2

log = logging.getLogger(__name__)
SERVICE = kv_store_pb2.DESCRIPTOR.services_by_name["KVStore"]


class KVStoreServicer:
    """Implements ``pdserve.v1.KVStore`` over a :class:`BlockStore` (see kv_store.proto)."""

    def __init__(
        self, store: BlockStore, metrics: StoreMetrics | None = None, authorizer: Authorizer | None = None
    ) -> None:
        """``authorizer``: who may call (default: open, :class:`~kv_store.auth.TokenAuthorizer`
        without a token; :func:`serve` passes the node's)."""
        self.store = store
        self.metrics = (
            metrics if metrics is not None else StoreMetrics(CollectorRegistry(), store.config.node_id)
        )
        self.metrics.set_stats_source(lambda: store.stats().node)
        self.authorizer: Authorizer = authorizer if authorizer is not None else TokenAuthorizer()
        # the last layout message a call carried that passed the layout check: an equal message
        # passes without being rebuilt and compared again (#12: the store's cost per handoff)
        self._layout_ok: common_pb2.KVLayout | None = None
        m = self.metrics
        # counters of Release's shm reads, looked up once (#12: not per release)
        self._shm_out_blocks = m.blocks.labels(m.node_id, "shm", "out")
        self._shm_out_bytes = m.bytes.labels(m.node_id, "shm", "out")

    def _member(self, context: grpc.ServicerContext, what: str) -> str:
        """The caller's identity if it is a cluster member; else UnauthenticatedError (counted)."""
        caller = self.authorizer.authorize(context)
        if not caller.allowed:
            self.store.count_denied()
            log_event(
                log, "kv call denied", logging.WARNING, rpc=what, peer=caller.identity, reason=caller.reason
            )
            raise UnauthenticatedError(
                f"KVStore.{what} is for pdserve cluster members only: {caller.reason}; give every "
                "process the cluster token (--cluster-token-file or PDSERVE_CLUSTER_TOKEN)"
            )
        return caller.identity

    def _owner(self, context: grpc.ServicerContext, identity: str) -> str:
        """Who a lease is charged to: metadata x-pdserve-lease-owner, else the caller."""
        return check_owner(metadata_value(context, LEASE_OWNER_METADATA_KEY) or identity)

    # ----------------------------------------------------------------- measured entries
    def Put(
        self, requests: Iterator[kv_store_pb2.PutChunk], context: grpc.ServicerContext
    ) -> kv_store_pb2.PutResponse:
        """:meth:`_put`, counted as a gRPC transfer in, logged with the caller's request id."""
        owner = self._owner(context, self._member(context, "Put"))
        return self._measured_put(context, lambda: self._put(requests, context, owner), owner)

    def PutBlocks(
        self, request: kv_store_pb2.PutBlocksRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.PutResponse:
        """:meth:`_put_blocks` (Put's unary form), counted and logged as a Put."""
        # refused as a Put: it is the Put of KV that fits one message (the caller chose no rpc)
        owner = self._owner(context, self._member(context, "Put"))
        return self._measured_put(context, lambda: self._put_blocks(request, owner), owner)

    def _measured_put(
        self, context: grpc.ServicerContext, put: Callable[[], kv_store_pb2.PutResponse], owner: str
    ) -> kv_store_pb2.PutResponse:
        """Run ``put`` counted as a gRPC transfer in, logged with the caller's request id."""
        with request_scope(request_id_from_context(context)):
            with self.metrics.transfer("grpc", "put", "in") as tally:
                resp = put()
                tally.add(resp.num_blocks, resp.num_blocks * self.store.layout.block_nbytes)
            log_event(log, "kv put", blocks=resp.num_blocks, stored=resp.num_stored, lease_id=resp.lease_id)
            if resp.conflicts:
                log_event(
                    log,
                    "kv put conflict",
                    logging.WARNING,
                    blocks=len(resp.conflicts),
                    detail="keys already stored with other bytes; write-once: stored bytes kept",
                )
            if resp.lease_ttl_clamped:
                log_event(log, "kv lease ttl clamped", ttl_s=resp.lease_ttl_s, owner=owner)
        return resp

    def Get(
        self, request: kv_store_pb2.GetRequest, context: grpc.ServicerContext
    ) -> Iterator[kv_store_pb2.GetChunk]:
        """:meth:`_get`, counted as a gRPC transfer out once the whole stream is sent."""
        self._member(context, "Get")
        with self.metrics.transfer("grpc", "get", "out") as tally:
            yield from self._get(request, context)
            n = len(request.block_hashes)
            tally.add(n, n * self.store.layout.block_nbytes)

    def Lease(
        self, request: kv_store_pb2.LeaseRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.LeaseResponse:
        """:meth:`_lease`; a lease of blocks pins them for a zero-copy read: counted as shm out."""
        owner = self._owner(context, self._member(context, "Lease"))
        n = len(request.block_hashes)
        if not n:
            return self._lease(request, context, owner)
        with self.metrics.transfer("shm", "lease", "out") as tally:
            resp = self._lease(request, context, owner)
            tally.add(n, n * self.store.layout.block_nbytes)
        return resp

    # ----------------------------------------------------------------- Put
    def _put(
        self, requests: Iterator[kv_store_pb2.PutChunk], context: grpc.ServicerContext, owner: str
    ) -> kv_store_pb2.PutResponse:
        store = self.store
        nbytes = store.layout.block_nbytes
        lease_id = ""
        lease_ttl, lease_clamped = 0.0, False
        conflicts: list[int] = []
        conflict_sums: list[int] = []
        ticket: PutTicket | None = None
        received = 0
        n_blocks = n_new = 0
        put_hashes: list[bytes] = []  # per block of the call, with the slot its ticket named
        put_slots: list[int] = []
        first = True
        try:
            for chunk in requests:
                if first:
                    first = False
                    self._check_layout_msg(chunk, "Put (first chunk)", "Put blocks")
                    if chunk.lease_ttl_s:
                        grant = store.lease([], chunk.lease_ttl_s, owner)
                        lease_id, lease_ttl, lease_clamped = grant.lease_id, grant.ttl_s, grant.ttl_clamped
                elif chunk.HasField("layout"):
                    store.check_layout(
                        convert.layout_from_proto(chunk.layout, "Put.layout"), what="Put blocks"
                    )
                if len(chunk.data) > MAX_CHUNK_BYTES:
                    raise InvalidRequestError(
                        f"Put: chunk of {len(chunk.data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte chunk limit"
                    )
                if chunk.block_hash:
                    if ticket is not None:
                        raise InvalidRequestError(
                            f"Put: block {n_blocks - 1} ended after {received} of {nbytes} bytes "
                            "(a new block_hash arrived early)"
                        )
                    (h,) = check_hash_list([chunk.block_hash], "Put.block_hash")
                    if chunk.total_bytes != nbytes:
                        raise InvalidRequestError(
                            f"Put: block {n_blocks} declares total_bytes={chunk.total_bytes}, "
                            f"but a block of this layout is {nbytes} bytes"
                        )
                    if not chunk.checksum:
                        raise InvalidRequestError(
                            f"Put: block {n_blocks} has no checksum (PutChunk.checksum, the XXH3-64 of "
                            "its bytes, kv_store/checksum.py); every block must carry its writer's checksum"
                        )
                    ticket = store.begin_put(h, chunk.checksum)
                    if ticket.conflict:
                        conflicts.append(n_blocks)
                        conflict_sums.append(ticket.stored_checksum)
                    put_hashes.append(h)
                    put_slots.append(ticket.slot)
                    received = 0
                    n_blocks += 1
                elif ticket is None:
                    if not chunk.data:
                        continue  # an empty keep-alive / layout-only chunk
                    raise InvalidRequestError(
                        "Put: data chunk before any block_hash (each block starts with one)"
                    )
                data = chunk.data
                if received + len(data) > nbytes:
                    raise InvalidRequestError(f"Put: block {n_blocks - 1} got more than its {nbytes} bytes")
                if ticket.is_new and data:
                    store.write(ticket, received, data)
                received += len(data)
                if received == nbytes:
                    store.commit(ticket, lease_id)
                    n_new += ticket.is_new
                    ticket = None
            if first:
                raise InvalidRequestError("Put: empty stream; send at least one chunk with a layout")
            if ticket is not None:
                raise InvalidRequestError(
                    f"Put: stream ended inside block {n_blocks - 1} ({received} of {nbytes} bytes)"
                )
        except BaseException:
            if ticket is not None:
                store.abort(ticket)
            if lease_id:
                store.release(lease_id)
            raise
        return self._put_response(
            lease_id, lease_ttl, lease_clamped, put_hashes, put_slots, n_new, conflicts, conflict_sums
        )

    def _put_blocks(self, request: kv_store_pb2.PutBlocksRequest, owner: str) -> kv_store_pb2.PutResponse:
        """PutBlocks: every block whole in one message. The whole request is checked (layout,
        hashes, sizes, checksums present) before anything is stored; then each block is stored
        and verified against its checksum as :meth:`_put` does (a mismatch refuses the call and
        releases its lease; blocks committed before it stay, as with Put)."""
        store = self.store
        self._check_layout_msg(request, "PutBlocks", "Put blocks")
        nbytes = store.layout.block_nbytes
        blocks = request.blocks
        hashes = check_hash_list([b.block_hash for b in blocks], "PutBlocks.blocks.block_hash")
        for i, b in enumerate(blocks):
            if len(b.data) != nbytes:
                raise InvalidRequestError(
                    f"PutBlocks: block {i} has {len(b.data)} bytes, a block of this layout is {nbytes} bytes"
                )
            if not b.checksum:
                raise InvalidRequestError(
                    f"PutBlocks: block {i} has no checksum (PutBlock.checksum, the XXH3-64 of its bytes, "
                    "kv_store/checksum.py); every block must carry its writer's checksum"
                )
        lease_id = ""
        lease_ttl, lease_clamped = 0.0, False
        if request.lease_ttl_s:
            grant = store.lease([], request.lease_ttl_s, owner)
            lease_id, lease_ttl, lease_clamped = grant.lease_id, grant.ttl_s, grant.ttl_clamped
        conflicts: list[int] = []
        conflict_sums: list[int] = []
        put_slots: list[int] = []
        n_new = 0
        ticket: PutTicket | None = None
        try:
            for i, (h, b) in enumerate(zip(hashes, blocks, strict=True)):
                ticket = store.begin_put(h, b.checksum)
                if ticket.conflict:
                    conflicts.append(i)
                    conflict_sums.append(ticket.stored_checksum)
                put_slots.append(ticket.slot)
                if ticket.is_new:
                    store.write(ticket, 0, b.data)
                store.commit(ticket, lease_id)
                n_new += ticket.is_new
                ticket = None
        except BaseException:
            if ticket is not None:
                store.abort(ticket)
            if lease_id:
                store.release(lease_id)
            raise
        return self._put_response(
            lease_id, lease_ttl, lease_clamped, list(hashes), put_slots, n_new, conflicts, conflict_sums
        )

    def _put_response(
        self,
        lease_id: str,
        lease_ttl: float,
        lease_clamped: bool,
        put_hashes: list[bytes],
        put_slots: list[int],
        n_new: int,
        conflicts: list[int],
        conflict_sums: list[int],
    ) -> kv_store_pb2.PutResponse:
        """The PutResponse of a Put / PutBlocks call that stored ``put_hashes`` (``n_new`` of them
        newly) in the slots their tickets named."""
        store = self.store
        # leased blocks: tell the caller their arena slots (zero-rpc same-host reads while the
        # lease holds); empty if any block is not (yet) stored in the slot its ticket named
        slots, expires = (
            store.leased_slots_and_expiry(lease_id, put_hashes, put_slots) if lease_id else ((), 0.0)
        )
        n_blocks = len(put_hashes)
        result = PutResult(
            num_blocks=n_blocks,
            num_stored=n_new,
            num_existing=n_blocks - n_new,
            lease_id=lease_id,
            lease_expires_at_unix_s=expires,
            location=store.location,
            slots=slots,
            slot_nbytes=store.arena.slot_nbytes if slots else 0,
            shm_name=store.arena.name,
            conflicts=tuple(conflicts),
            conflict_checksums=tuple(conflict_sums),
            lease_ttl_s=lease_ttl,
            lease_ttl_clamped=lease_clamped,
        )
        return convert.put_result_to_proto(result)

    # ----------------------------------------------------------------- Get
    def _get(
        self, request: kv_store_pb2.GetRequest, context: grpc.ServicerContext
    ) -> Iterator[kv_store_pb2.GetChunk]:
        store = self.store
        self._check_layout(request, "Get", required=True)
        hashes = check_hash_list(request.block_hashes, "Get.block_hashes")
        nbytes = store.layout.block_nbytes
        with store.pinned_views(hashes) as views:
            sums = store.checksums(hashes)  # stable: the blocks are pinned
            for i, (h, view) in enumerate(zip(hashes, views, strict=True)):
                for off in range(0, nbytes, MAX_CHUNK_BYTES):
                    if off == 0:
                        header = kv_store_pb2.GetChunk(
                            block_index=i, block_hash=h, total_bytes=nbytes, checksum=sums[i]
                        )
                    else:
                        header = kv_store_pb2.GetChunk(block_index=i)
                    # one copy: arena slot -> serialised message (kv_store/wire.py)
                    yield encode_chunk(header, view[off : off + MAX_CHUNK_BYTES])

    # ----------------------------------------------------------------- small rpcs
    def Exists(
        self, request: kv_store_pb2.ExistsRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.ExistsResponse:
        self._member(context, "Exists")
        hashes = check_hash_list(request.block_hashes, "Exists.block_hashes")
        return kv_store_pb2.ExistsResponse(exists=self.store.exists(hashes))

    def Delete(
        self, request: kv_store_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.DeleteResponse:
        self._member(context, "Delete")
        hashes = check_hash_list(request.block_hashes, "Delete.block_hashes")
        return convert.delete_to_proto(self.store.delete(hashes))

    def Lookup(
        self, request: kv_store_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.LookupResponse:
        self._member(context, "Lookup")
        hashes = check_hash_list(request.block_hashes, "Lookup.block_hashes")
        found = self.store.lookup(hashes)
        self.metrics.observe_lookup(len(hashes), found.num_prefix_blocks)
        return convert.lookup_to_proto(found)

    def _lease(
        self, request: kv_store_pb2.LeaseRequest, context: grpc.ServicerContext, owner: str
    ) -> kv_store_pb2.LeaseResponse:
        self._check_layout(request, "Lease", required=False)
        hashes = check_hash_list(request.block_hashes, "Lease.block_hashes")
        for lease_id in request.release_lease_ids:
            self.store.release(lease_id)
        if not hashes:
            return convert.lease_to_proto(self.store.no_lease())
        grant = self.store.lease(hashes, request.ttl_s, owner)
        if grant.ttl_clamped:
            log_event(log, "kv lease ttl clamped", asked_s=request.ttl_s, ttl_s=grant.ttl_s, owner=owner)
        return convert.lease_to_proto(grant)

    def Release(
        self, request: kv_store_pb2.ReleaseRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.ReleaseResponse:
        self._member(context, "Release")
        released = self._release(request, request_id_from_context(context))
        return kv_store_pb2.ReleaseResponse(released=released)

    def ReleaseBatch(
        self, request: kv_store_pb2.ReleaseBatchRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.ReleaseBatchResponse:
        """Each item as its own Release (in order, each logged under its request id), in one
        call (#12: a client's releases issued together). An item without a release is refused
        (INVALID_ARGUMENT) before any is released."""
        self._member(context, "ReleaseBatch")
        for i, item in enumerate(request.items):
            if not item.HasField("release"):
                raise InvalidRequestError(f"ReleaseBatch: item {i} has no release")
        fallback = request_id_from_context(context)
        return kv_store_pb2.ReleaseBatchResponse(
            released=[self._release(item.release, item.request_id or fallback) for item in request.items]
        )

    def _release(self, request: kv_store_pb2.ReleaseRequest, request_id: str) -> bool:
        """Release one lease (ReleaseRequest's contract), counted and logged under ``request_id``."""
        released, held = self.store.release_counted(request.lease_id, request.shm_read_blocks)
        shm_read = min(request.shm_read_blocks, held)
        if shm_read:
            # blocks the consumer read from the arena with no rpc (the handoff's leased slots):
            # shm transfers out the node saw no Lease for; counted, no latency (none was measured)
            self._shm_out_blocks.inc(shm_read)
            self._shm_out_bytes.inc(shm_read * self.store.layout.block_nbytes)
        # logged under request_id ("" : none, as no scope is bound on a server thread)
        log_event(
            log,
            "kv release",
            request_id=request_id,
            lease_id=request.lease_id,
            released=released,
            shm_read_blocks=shm_read,
        )
        return released

    def Stats(
        self, request: kv_store_pb2.KVStoreStatsRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.KVStoreStats:
        self._member(context, "Stats")
        return convert.stats_to_proto(self.store.stats())

    def _check_layout(self, request: object, what: str, *, required: bool) -> None:
        """The request's ``layout`` must be the node's (InvalidRequestError when ``required`` and
        missing; LayoutMismatchError naming each differing field)."""
        if not required and not request.HasField("layout"):  # type: ignore[attr-defined]
            return
        self._check_layout_msg(request, what, f"{what} blocks")

    def _check_layout_msg(self, request: object, what: str, blocks_what: str) -> None:
        """:func:`convert.required_layout` of ``request`` checked against the node's layout
        (``blocks_what`` names the blocks in a mismatch). A layout message equal to the last one
        that passed passes at once: the same fields give the same layout and the same verdict."""
        if not request.HasField("layout"):  # type: ignore[attr-defined]
            convert.required_layout(request, what)  # raises, naming what lacks it
        msg = request.layout  # type: ignore[attr-defined]
        ok = self._layout_ok
        if ok is not None and msg == ok:
            return
        self.store.check_layout(convert.required_layout(request, what), what=blocks_what)
        accepted = common_pb2.KVLayout()
        accepted.CopyFrom(msg)
        self._layout_ok = accepted


@dataclass
class StoreServer:
    """A running store node: its :class:`BlockStore` and gRPC server."""

    store: BlockStore
    server: grpc.Server
    port: int
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return self.store.location.address

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace_s``), then free the store (unlinks shm)."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.store.close()

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def serve(
    config: StoreConfig,
    index: KVIndex | None = None,
    *,
    store: BlockStore | None = None,
    metrics: StoreMetrics | None = None,
    security: SecurityConfig | None = None,
    authorizer: Authorizer | None = None,
) -> StoreServer:
    """Start a store node's gRPC server on ``config.host:config.port`` (port 0: any free port).

    ``security`` (default :func:`pdserve.security.current`): TLS on the port, a client
    certificate signed by the cluster CA required under mutual TLS, plaintext only on loopback
    (:class:`pdserve.security.SecurityConfigError` otherwise, before anything is allocated).

    Returns once the server accepts calls; ``StoreServer.port`` is the bound port. ``metrics``:
    where its transfers are counted (default: a private registry). ``authorizer``: who may call
    (default :func:`default_authorizer`: the cluster token; development mode on loopback without
    one; :class:`kv_store.auth.AuthConfigError` off loopback without one).
    """
    # transport only: the cluster-token check of KVStore calls is the store's own (kv_store/auth.py)
    sec = server_security([SERVICE.full_name], security)
    sec.config.check_bind(config.host)
    if authorizer is None:
        authorizer = default_authorizer(config, sec.config)
    store = store if store is not None else BlockStore(config, index)
    try:
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.max_workers, thread_name_prefix=f"kvstore-{config.node_id}"
            ),
            options=[*grpc_options(), *KEEPALIVE.server_options()],
        )
        add_servicer(server, SERVICE, KVStoreServicer(store, metrics, authorizer))
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE.full_name):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = bind(server, config.host, config.port, sec)
        server.start()
    except BaseException:
        store.close()
        raise
    store.set_address(f"{config.host}:{port}")
    return StoreServer(store, server, port, health_servicer)


def default_authorizer(config: StoreConfig, security: SecurityConfig) -> Authorizer:
    """The node's :class:`~kv_store.auth.TokenAuthorizer`: token from ``config.cluster_token``, else
    the process's security configuration, else the environment. Under mutual TLS with required
    client certificates every connected peer was verified at the handshake: no token needed."""
    if security.require_client_certs(True):
        return TokenAuthorizer("")
    token = config.cluster_token or security.cluster_token or cluster_token_from_env()
    return authorizer_for(config.host, token)


def run_store_node(
    config: StoreConfig, index: KVIndex | None = None, *, on_ready=None, metrics: StoreMetrics | None = None
) -> None:
    """Run a store node in this process until SIGTERM/SIGINT; ``on_ready(StoreServer)`` once bound."""
    srv = serve(config, index, metrics=metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if on_ready is not None:
            on_ready(srv)
        stop.wait()
    finally:
        srv.stop(1.0)
