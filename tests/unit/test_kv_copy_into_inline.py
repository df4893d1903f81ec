"""FetchedBlocks.copy_into verifies small reads on the calling thread (#12) and large ones pipelined
on the checksum thread: both copy the same bytes and refuse the same corrupted block."""

from __future__ import annotations

import numpy as np
import pytest

from kv_store import transport
from kv_store.checksum import KVChecksumError, block_checksum
from kv_store.transport import FetchedBlocks


def _blocks(n: int, nb: int) -> list[memoryview]:
    rng = np.random.default_rng(n * nb)
    return [memoryview(rng.integers(0, 256, nb, dtype=np.uint8).tobytes()) for _ in range(n)]


@pytest.mark.parametrize("nb", [1024, transport.INLINE_CHECKSUM_MAX_BYTES])  # 4 blocks: inline, pipelined
def test_copy_into_copies_and_verifies_small_and_large_reads(nb: int) -> None:
    views = _blocks(4, nb)
    sums = [block_checksum(v) for v in views]
    out = bytearray(4 * nb)
    FetchedBlocks(views, checksums=sums).copy_into(out)
    assert bytes(out) == b"".join(bytes(v) for v in views)
    mismatches: list[int] = []
    bad = list(sums)
    bad[2] ^= 1
    with pytest.raises(KVChecksumError, match="block 2 failed its checksum"):
        FetchedBlocks(views, checksums=bad, on_mismatch=lambda: mismatches.append(1)).copy_into(
            bytearray(4 * nb)
        )
    assert mismatches == [1]
