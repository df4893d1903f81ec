"""Live migration with tensor-parallel engines (engine/tp_runner.py, TP on CPU over gloo):
TP=2 -> TP=2, and across TP sizes (TP=2 -> TP=1, TP=1 -> TP=2). The migration's KV stages are in
the whole model's layout (``LLMEngine.kv_shape``: every KV head): a TP source gathers its ranks'
heads when it copies a stage (``TPModelRunner.export_blocks``), a TP destination splits them over
its ranks as it writes them (``import_blocks``), so the sizes need not match. Greedy and seeded
outputs equal an unmigrated run; an abort mid-copy leaves no block on either side."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.migration import MigrationExport, MigrationImport
from engine.sampling_params import SamplingParams
from tests.test_migration_engine import _no_leaks, _prompt, _run, _steps
from tests.workers import InProcDecodeWorker

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)


def _engine(path, tp: int) -> LLMEngine:
    return LLMEngine.from_pretrained(
        path,
        EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=256, tensor_parallel_size=tp),
    )


@pytest.fixture(scope="module")
def engines(tiny_models):
    path = tiny_models["llama"]
    es = {"tp2a": _engine(path, 2), "tp2b": _engine(path, 2), "tp1": _engine(path, 1)}
    yield es
    for e in es.values():
        e.close()


def _migrate(
    src: LLMEngine, dst: LLMEngine, rid: str, prompt: list[int], params: SamplingParams
) -> list[int]:
    """Start ``rid`` on ``src``, move it to ``dst`` in two stages and a stop-and-copy while it
    decodes, finish it there; its whole output."""
    src.add_request(rid, prompt, params)
    _steps(src, 4)
    exp = MigrationExport(src, rid)
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    _steps(src, 4)
    imp.add_stage(exp.next_stage())
    final = exp.stop_and_copy()
    imp.finish(final)
    exp.commit()
    return _run(dst, rid)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize(
    "route", [("tp2a", "tp2b"), ("tp2a", "tp1"), ("tp1", "tp2b")], ids=["2to2", "2to1", "1to2"]
)
def test_tp_migration_matches_the_unmigrated_run(engines, params, route):
    src, dst = engines[route[0]], engines[route[1]]
    prompt = _prompt(29, seed=3)
    ref = engines["tp1"].generate([prompt], params)[0].token_ids
    assert _migrate(src, dst, f"m-{'-'.join(route)}-{params.temperature}", prompt, params) == ref
    _no_leaks(src, dst)


def test_tp_destination_aborting_mid_copy_leaks_nothing(engines):
    src, dst = engines["tp2a"], engines["tp2b"]
    prompt = _prompt(29, seed=4)
    ref = engines["tp1"].generate([prompt], GREEDY)[0].token_ids
    src.add_request("ab", prompt, GREEDY)
    _steps(src, 4)
    exp = MigrationExport(src, "ab")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    imp.abort()  # the destination gives up (its peer died, the caller cancelled)
    exp.resume()
    assert _run(src, "ab") == ref  # it went on where it was
    _no_leaks(src, dst)


# ---------------------------------------------------------------------------- decode workers
def _tp_worker(path, name: str, tp: int) -> InProcDecodeWorker:
    """An in-process decode worker whose engine runs ``tp`` ranks (see tests/test_migration_worker)."""
    return InProcDecodeWorker(
        path, name, engine_config=EngineConfig(num_kv_blocks=64, block_size=16, tensor_parallel_size=tp)
    )


@pytest.fixture(scope="module")
def tp_workers(tiny_models, engines):
    path = tiny_models["llama"]
    two, one = _tp_worker(path, "tp2-w", 2), _tp_worker(path, "tp1-w", 1)
    yield two, one
    for w in (two, one):
        w.stop()


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_decode_workers_of_different_tp_migrate_over_grpc(tp_workers, direction):
    import asyncio

    from router.migration_client import MigrationResult
    from tests.test_migration_worker import GREEDY as W_GREEDY
    from tests.test_migration_worker import SEEDED as W_SEEDED
    from tests.test_migration_worker import _migrated_run, _reference, _wait_idle

    two, one = tp_workers
    src, dst = (two, one) if direction == "2to1" else (one, two)
    params = W_GREEDY if direction == "2to1" else W_SEEDED
    ref = asyncio.run(_reference(one, f"tpref-{direction}", params))  # an unmigrated TP=1 run
    out, result, k = asyncio.run(_migrated_run(src, dst, f"tpmig-{direction}", params, after=8))
    assert result is MigrationResult.MIGRATED and k >= 8
    assert out == ref
    _wait_idle(src, dst)
