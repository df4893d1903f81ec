"""Chained block hashes: the key of a KV block everywhere in pdserve.

Contract (stable across processes, hosts and Python versions; changing it is a wire break):

    key(block i) = BLAKE2b-128(
        person = b"pdserve-kv-v1",
        data   = parent_key                       # 16 bytes; 16 zero bytes for the first block
               + u32_le(len(model_id))   + model_id.utf8
               + u32_le(len(adapter_id)) + adapter_id.utf8
               + u32_le(len(salt))       + salt.utf8
               + u32_le(n_tokens)        + n_tokens x i64_le(token_id)
    )

So the same key means the same tokens, at the same position in the same prefix, for the same
model, adapter and tenant salt: hence the same KV bytes. Only *full* blocks are ever cached in a
prefix cache; a partial tail block hashes differently (its ``n_tokens`` differs) and is used only
to name a block in a one-off handoff.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes
KEY_BYTES = 16
ROOT_PARENT: BlockHash = b"\x00" * KEY_BYTES
_PERSON = b"pdserve-kv-v1"


def _field(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    model_id: str,
    adapter_id: str = "",
    salt: str = "",
) -> BlockHash:
    """Key of one block given its parent's key (``None`` for the first block)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON)
    h.update(parent if parent is not None else ROOT_PARENT)
    h.update(_field(model_id))
    h.update(_field(adapter_id))
    h.update(_field(salt))
    n = len(token_ids)
    h.update(struct.pack(f"<I{n}q", n, *token_ids))
    return h.digest()


def chain_hashes(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    adapter_id: str = "",
    salt: str = "",
    *,
    include_partial: bool = False,
    start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Keys of consecutive blocks of ``token_ids`` starting at block index ``start``.

    ``parent`` must be the key of block ``start - 1`` when ``start > 0``. With
    ``include_partial`` the trailing partial block (if any) gets a key too.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if start > 0 and parent is None:
        raise ValueError("parent key is required when start > 0")
    out: list[BlockHash] = []
    n = len(token_ids)
    i = start * block_size
    while i + block_size <= n:
        parent = hash_block(parent, token_ids[i : i + block_size], model_id, adapter_id, salt)
        out.append(parent)
        i += block_size
    if include_partial and i < n:
        out.append(hash_block(parent, token_ids[i:n], model_id, adapter_id, salt))
    return out
