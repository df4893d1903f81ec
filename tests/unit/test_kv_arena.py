"""Shared-memory arena: slots, zero-copy attach from this and another process, no leaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kv_store.arena import ArenaReader, HeapArena, ShmArena, host_id
from kv_store.layout import KVLayout
from kv_store.tensors import block_tensor, gather_block, scatter_block, tensor_bytes

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")


def shm_exists(name: str) -> bool:
    return (SHM / name).exists()


def test_alloc_free_and_views() -> None:
    with ShmArena(slot_nbytes=10_000, capacity=3) as arena:
        assert shm_exists(arena.name)
        slots = [arena.alloc() for _ in range(3)]
        assert slots == [0, 1, 2] and arena.alloc() is None
        arena.free(1)
        with pytest.raises(ValueError):
            arena.free(1)
        assert arena.alloc() == 1
        v = arena.view(2)
        assert v.nbytes == 10_000 and not v.readonly
        v[:3] = b"abc"
        del v
        with pytest.raises(IndexError):
            arena.view(3)
        name = arena.name
    assert not shm_exists(name)


def test_reader_same_process_is_zero_copy() -> None:
    arena = ShmArena(slot_nbytes=4096, capacity=4)
    try:
        with ArenaReader(arena.name) as reader:
            w, r = arena.view(1), reader.view(1, 4096)
            w[:5] = b"hello"
            assert bytes(r[:5]) == b"hello"
            w[0:1] = b"J"  # same physical memory: the reader sees the write
            assert bytes(r[:5]) == b"Jello"
            del w, r
    finally:
        arena.close()
    assert not shm_exists(arena.name)


def test_reader_in_another_process_and_no_leak() -> None:
    arena = ShmArena(slot_nbytes=1 << 16, capacity=2)
    try:
        arena.view(1)[:] = bytes(range(256)) * 256
        code = (
            "import sys, hashlib; from kv_store.arena import ArenaReader\n"
            "r = ArenaReader(sys.argv[1]); v = r.view(1, 1 << 16)\n"
            "print(hashlib.sha256(v).hexdigest()); v[0:1] = b'X'; del v; r.close()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, arena.name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        import hashlib

        assert out.stdout.strip() == hashlib.sha256(bytes(range(256)) * 256).hexdigest()
        assert "leaked" not in out.stderr and "Traceback" not in out.stderr
        # the reader exiting must not unlink the owner's segment (resource_tracker pitfall)
        assert shm_exists(arena.name)
        assert bytes(arena.view(1)[:1]) == b"X"
    finally:
        arena.close()
    assert not shm_exists(arena.name)


def test_close_with_live_view_still_unlinks() -> None:
    arena = ShmArena(slot_nbytes=4096, capacity=1)
    v = arena.view(0)
    arena.close()
    assert not shm_exists(arena.name)
    v[:1] = b"x"  # the mapping lives as long as the view
    del v
    arena.close()  # idempotent


def test_attach_missing_arena() -> None:
    with pytest.raises(FileNotFoundError):
        ArenaReader("pdkv_does_not_exist_0")


def test_heap_arena_fake() -> None:
    with HeapArena(slot_nbytes=8, capacity=2) as a:
        assert a.name == "" and a.alloc() == 0
        a.view(0)[:] = b"12345678"
        assert bytes(a.view(0)) == b"12345678"


def test_host_id_stable() -> None:
    assert host_id() == host_id() and host_id()


def test_block_tensor_views_the_slot_and_gather_scatter_round_trip() -> None:
    lay = KVLayout("m", num_layers=3, num_kv_heads=2, head_dim=4, dtype="bfloat16", block_size=5)
    caches = [torch.randn(2, 7, 5, 2, 4).to(torch.bfloat16) for _ in range(3)]
    with ShmArena(lay.block_nbytes, capacity=2) as arena:
        slot = arena.view(0)
        gather_block(caches, block_id=4, out=slot)  # engine -> arena: one copy
        t = block_tensor(slot, lay)
        assert t.shape == lay.block_shape
        for layer in range(3):
            assert torch.equal(t[layer, 0], caches[layer][0, 4]) and torch.equal(
                t[layer, 1], caches[layer][1, 4]
            )
        t[0, 0, 0, 0, 0] = 42.0  # zero copy: writes land in the slot
        assert bytes(tensor_bytes(t)) == bytes(slot)
        dst = [torch.zeros(2, 7, 5, 2, 4, dtype=torch.bfloat16) for _ in range(3)]
        scatter_block(t, dst, block_id=1)
        assert dst[0][0, 1, 0, 0, 0].item() == 42.0 and torch.equal(dst[2][:, 1], caches[2][:, 4])
        del t, slot
