"""engine.kv_disk.DiskKVTier: preallocated segment files, exact round trips, checksums that turn
a corrupt, truncated or never-written block into a reported bad block, and failed writes."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from engine.kv_disk import DiskKVTier


def _host(n: int, dtype=torch.float32) -> torch.Tensor:
    # block-major [blocks, layers, 2, block_size, kv_heads, head_dim] like HostKVCache.cache
    return torch.randn(n, 2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(n)).to(dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_across_segments(tmp_path, dtype):
    host = _host(6, dtype)
    nb = _nbytes(host)
    tier = DiskKVTier(tmp_path, 5, nb, segment_bytes=2 * nb)  # 3 segments: 2 + 2 + 1 blocks
    assert len(tier.paths) == 3 and [p.stat().st_size for p in tier.paths] == [2 * nb, 2 * nb, nb]
    assert tier.location(3) == (tier.paths[1], nb)
    want = host.clone()
    assert tier.write(host, [(0, 4), (1, 0), (2, 3)]) == set()
    host[3:6] = 0
    assert tier.read(host, [(4, 3), (0, 4), (3, 5)]) == set()
    assert torch.equal(host[3], want[0]) and torch.equal(host[4], want[1]) and torch.equal(host[5], want[2])
    assert tier.stats.blocks_written == 3 and tier.stats.blocks_read == 3
    assert sum(n for n, _ in tier.take_timings()) == 6 * nb and tier.take_timings() == []
    paths = list(tier.paths)
    tier.close()
    tier.close()  # idempotent
    assert not any(p.exists() for p in paths)


def test_corrupt_truncated_and_unwritten_blocks_are_reported_bad(tmp_path):
    host = _host(4)
    nb = _nbytes(host)
    tier = DiskKVTier(tmp_path, 4, nb)
    assert tier.write(host, [(0, 0), (1, 1), (2, 2)]) == set()
    path, off = tier.location(1)
    with open(path, "r+b") as f:  # one flipped byte in block 1
        f.seek(off + 7)
        b = f.read(1)
        f.seek(off + 7)
        f.write(bytes([b[0] ^ 0xFF]))
    os.truncate(path, tier.location(2)[1] + nb // 2)  # block 2 cut in half
    assert tier.read(host, [(0, 3), (1, 1), (2, 2)]) == {1, 2}
    assert tier.stats.corrupt_blocks == 2 and tier.stats.blocks_read == 1
    assert tier.read(host, [(3, 0)]) == {0}  # never written
    assert tier.read(host, [(0, 0)]) == {0}  # already read: the slot's content is no longer valid
    with pytest.raises(IndexError):
        tier.read(host, [(4, 0)])


def test_failed_writes_are_reported_not_raised(tmp_path):
    host = _host(3)
    tier = DiskKVTier(tmp_path, 3, _nbytes(host))
    calls = []

    def flaky(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        DiskKVTier._pwrite(tier, fd, data, offset)

    tier._pwrite = flaky
    assert tier.write(host, [(0, 0), (1, 1), (2, 2)]) == {1}
    assert tier.stats.write_errors == 1 and tier.stats.blocks_written == 2
    out = torch.zeros_like(host)
    assert tier.read(out, [(0, 0), (1, 1), (2, 2)]) == {1}  # the failed block is never served
    assert torch.equal(out[0], host[0]) and torch.equal(out[2], host[2])


def test_a_directory_that_cannot_hold_the_tier_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot create .* segment files in .*missing"):
        DiskKVTier(tmp_path / "missing", 2, 64)
    with pytest.raises(ValueError, match=">= 1 block"):
        DiskKVTier(tmp_path, 0, 64)
    assert list(tmp_path.iterdir()) == []
