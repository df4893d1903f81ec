"""Size limits shared by every gRPC server and client of pdserve (pure; no grpc import).

``MAX_CHUNK_BYTES`` bounds the payload of one streamed chunk (KV block data); a service refuses a
bigger chunk with INVALID_ARGUMENT. ``MAX_MESSAGE_BYTES`` is the transport limit set on every
channel and server through :func:`grpc_options`; a message above it is refused by gRPC itself
(RESOURCE_EXHAUSTED) before any pdserve code sees it.
"""

from __future__ import annotations

MAX_CHUNK_BYTES = 1 << 20  # 1 MiB of payload per streamed chunk
MAX_MESSAGE_BYTES = 8 << 20  # 8 MiB per gRPC message, any direction
MAX_BLOCKS_PER_CALL = 65536  # block hashes named by one KV store request


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options applying the message limit in both directions."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
