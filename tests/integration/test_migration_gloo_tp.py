"""Live migration over a real gloo process group (MIGRATION_TRANSPORT_DIST) between
tensor-parallel decode workers of different TP sizes, end to end over real processes on loopback.

Three decode worker processes (``python -m decode_worker``, a tiny random Llama) in one gloo group
(``--dist-init``): rank 0 with ``--tp 2``, rank 1 with ``--tp 1``, rank 2 with ``--tp 2`` and a
small KV pool. A migration's stages are in the whole model's layout (a TP source gathers its
ranks' heads, a TP destination splits them), wait in the source's outbox and go to the
destination over gloo (``KVPeer.PushKV`` on the source + a receive on the destination), so TP
sizes need not match: 2 -> 1, 1 -> 2 and 2 -> 2 are run, greedy and seeded, and each output must
equal the unmigrated run's. A destination out of blocks aborts the migration: the request
finishes on its source with the same output. Afterwards no worker holds a KV block.

The stream helpers (a Decode migrated mid-way and followed on the destination) are those of
tests/test_migration_worker.py; the in-process DIST tests (every abort, outbox entries) are
tests/test_migration_dist.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from pdserve.launcher import ClusterSpec, LocalCluster, _spawn, free_port
from router.migration_client import MigrationResult, MigrationTransport
from tests.integration.clusters import logged, paced_workers
from tests.test_migration_worker import GREEDY, LONG, PROMPT, SEEDED, _migrated_run
from tests.workers import worker_stats

DIST = MigrationTransport.DIST
# (TP size, KV blocks of 16 tokens) per rank: rank 2 holds a 160-token run (13 blocks) but not a
# long one migrated late (over 16 blocks)
RANKS = ((2, 64), (1, 64), (2, 16))
START_S = 300.0  # a loaded 2-core host starts processes slowly
# each worker step lasts at least this long: a tiny model on the native kernels decodes 160 tokens
# faster than a migration's stages cross the group, and the source would finish first
MIN_STEP_S = 0.005


@dataclass(frozen=True)
class _Proc:
    """A decode worker process (what the stream helpers need: its address)."""

    name: str
    address: str
    rank: int


@pytest.fixture(scope="module")
def group(tiny_models):
    path = str(tiny_models["llama"])
    cl = LocalCluster(ClusterSpec(model_path=path))
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    try:
        with paced_workers(MIN_STEP_S):
            for rank, (tp, blocks) in enumerate(RANKS):
                name = f"decode-{rank}"
                info = _spawn(
                    cl,
                    name,
                    [
                        "-m",
                        "decode_worker",
                        "--worker-id",
                        name,
                        "--model",
                        path,
                        "--store",
                        "127.0.0.1:1",  # never used: every migration goes over the group
                        "--kv-blocks",
                        str(blocks),
                        "--block-size",
                        "16",
                        "--tp",
                        str(tp),
                        "--no-direct-streams",
                        "--dist-init",
                        init,
                        "--dist-rank",
                        str(rank),
                        "--dist-world",
                        str(len(RANKS)),
                    ],
                    START_S,
                )
                procs.append(_Proc(name, info["address"], rank))
        yield cl, procs
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The unmigrated outputs of the whole engine (TP 1)."""
    e = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=64, block_size=16))
    try:
        outs = e.generate([PROMPT] * 3, [GREEDY, SEEDED, LONG])
    finally:
        e.close()
    return {"greedy": outs[0].token_ids, "seeded": outs[1].token_ids, "long": outs[2].token_ids}


def _idle(procs, timeout_s: float = 30.0) -> None:
    """Every worker holds no KV block and runs nothing (the migrated copies and aborted imports
    were freed on both sides)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [worker_stats(p.address) for p in procs]
        busy = [
            (s.worker_id, s.kv_blocks_used, s.num_running) for s in stats if s.kv_blocks_used or s.num_running
        ]
        if not busy:
            return
        assert time.monotonic() < deadline, f"workers still hold KV blocks: {busy}"
        time.sleep(0.1)


def _pushes(cl, name: str, dst_rank: int) -> int:
    return sum(1 for r in logged(cl, name, "direct push") if int(r["dst_rank"]) == dst_rank)


@pytest.mark.parametrize("params", ["greedy", "seeded"])
@pytest.mark.parametrize("route", [(0, 1), (1, 2), (0, 2)], ids=["tp2to1", "tp1to2", "tp2to2"])
def test_dist_migration_between_tp_sizes_equals_the_unmigrated_run(group, reference, route, params):
    cl, procs = group
    src, dst = procs[route[0]], procs[route[1]]
    sampling = GREEDY if params == "greedy" else SEEDED
    before = _pushes(cl, src.name, dst.rank)
    rid = f"tp-{src.rank}-{dst.rank}-{params}"
    out, result, k = asyncio.run(_migrated_run(src, dst, rid, sampling, 8, DIST))  # type: ignore[arg-type]
    assert result is MigrationResult.MIGRATED and k >= 8
    assert out == reference[params]
    # the stages went over gloo from the source's outbox to the destination's rank
    assert _pushes(cl, src.name, dst.rank) > before
    migrated = [r for r in logged(cl, src.name, "migrate out") if r.get("request_id") == rid]
    assert migrated and migrated[-1]["result"] == "MIGRATED", migrated
    _idle(procs)


def test_dist_migration_to_a_full_tp_destination_aborts_and_leaks_nothing(group, reference):
    cl, procs = group
    src, small = procs[0], procs[2]
    out, result, _ = asyncio.run(_migrated_run(src, small, "tp-full", LONG, 300, DIST))  # type: ignore[arg-type]
    assert result is MigrationResult.ABORTED_DEST_FULL, result
    assert out == reference["long"]  # it finished where it was
    _idle(procs)
