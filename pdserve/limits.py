"""Size limits shared by every gRPC server and client of pdserve (pure; no grpc import).

``MAX_CHUNK_BYTES`` bounds the payload of one streamed chunk (KV block data); a service refuses a
bigger chunk with INVALID_ARGUMENT. ``MAX_MESSAGE_BYTES`` is the transport limit set on every
channel and server through :func:`grpc_options`; a message above it is refused by gRPC itself
(RESOURCE_EXHAUSTED) before any pdserve code sees it.

``MAX_PENDING_CALLS`` bounds, on every server, the calls that have arrived but that the server's
code has not taken yet. gRPC's own defaults (1,000, then a hard 3,000) are far below what one
``grpc.aio`` server takes in a burst: its event loop takes arriving calls one at a time, so
10,000 streams opened at once left about 3,000 accepted and failed the rest CANCELLED before any
pdserve code saw them (#12). ``MAX_UNTAKEN_S`` likewise replaces gRPC's 30 s limit on how long an
arrived call may wait to be taken (past it: CANCELLED; a busy router took the last of 10,000 calls
after more than 30 s). Load is shed by the router's own admission (RESOURCE_EXHAUSTED with
retry-after) and each caller's deadline, not by this backlog.
"""

from __future__ import annotations

MAX_CHUNK_BYTES = 1 << 20  # 1 MiB of payload per streamed chunk
MAX_MESSAGE_BYTES = 8 << 20  # 8 MiB per gRPC message, any direction
MAX_BLOCKS_PER_CALL = 65536  # block hashes named by one KV store request
MAX_PENDING_CALLS = 1 << 16  # calls arrived at a server and not yet taken by its code
MAX_UNTAKEN_S = 3600  # seconds such a call may wait (callers' deadlines end it before that)


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options applying the message limit in both directions, and (read by
    servers only; a channel ignores them) the pending-call backlog :data:`MAX_PENDING_CALLS` and
    :data:`MAX_UNTAKEN_S`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ("grpc.server_max_unrequested_time_in_server", MAX_UNTAKEN_S),
    ]
