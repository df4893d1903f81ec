"""Live migration between two engines (engine.migration; tiny random Llama, fp32, CPU): a request
moved mid-decode produces exactly the tokens of an unmigrated run (greedy and seeded), over
several stages while it keeps decoding, and every abort leaves no block held on either side."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.migration import (
    AbortReason,
    MigrationAborted,
    MigrationExport,
    MigrationImport,
    migrate_in_process,
)
from engine.sampling_params import SamplingParams
from pdserve.errors import (
    InvalidRequestError,
    LayoutMismatchError,
    ModelNotFoundError,
    ResourceExhaustedError,
)

BLOCKS = 128
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


def _prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


def _engine(path, blocks: int = BLOCKS) -> LLMEngine:
    return LLMEngine.from_pretrained(
        path, EngineConfig(num_kv_blocks=blocks, block_size=4, max_num_batched_tokens=256)
    )


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def src(llama):
    return _engine(llama)


@pytest.fixture(scope="module")
def dst(llama):
    return _engine(llama)


def _no_leaks(*engines: LLMEngine) -> None:
    for e in engines:
        assert not e.has_unfinished()
        assert not e.scheduler.paused
        assert e.kv.num_free_blocks == e.kv.num_blocks, "a KV block is still held"
        assert not e._tracked


def _run(e: LLMEngine, rid: str) -> list[int]:
    """Step ``e`` until ``rid`` finishes; its final cumulative token ids."""
    while True:
        for o in e.step():
            if o.request_id == rid and o.finished:
                return o.token_ids


def _steps(e: LLMEngine, n: int) -> None:
    for _ in range(n):
        e.step()


def _reference(e: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return e.generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_staged_migration_mid_decode_matches_unmigrated_run(src, dst, params):
    prompt = _prompt(37)
    ref = _reference(src, prompt, params)
    src.add_request("m1", prompt, params)
    _steps(src, 6)  # prefill + 5 decode steps
    exp = MigrationExport(src, "m1")
    imp = MigrationImport(dst, exp.header())
    s1 = exp.next_stage()
    assert s1.first_block == 0 and s1.num_blocks == (37 + 5 - 1) // 4
    imp.add_stage(s1)
    stages = 1
    for _ in range(3):  # the source keeps decoding between stages
        _steps(src, 5)
        assert exp.pending_blocks() > 0
        st = exp.next_stage()
        assert st.first_block == imp.blocks_held and st.num_blocks > 0
        imp.add_stage(st)
        stages += 1
    assert stages == 4
    final = exp.stop_and_copy()
    # paused: another step of the source does not advance it
    n_out = len(final.output_token_ids)
    _steps(src, 2)
    assert len(exp.req.output_token_ids) == n_out
    imp.finish(final)
    exp.commit()
    # the destination keys the migrated blocks as the source did (its prefix cache can serve them)
    moved = dst.scheduler.requests["m1"].block_hashes
    assert len(moved) >= 10 and moved == exp.req.block_hashes[: len(moved)]
    assert dst.kv.pool.lookup(moved[-1]) is not None
    assert final.output_token_ids == ref[:n_out]
    assert _run(dst, "m1") == ref
    _no_leaks(src, dst)


def test_migration_keeps_prefix_blocks_shared_on_the_source(src, dst):
    shared = _prompt(32, seed=3)
    a, b = shared + _prompt(5, seed=4), shared + _prompt(9, seed=5)
    ref_b = _reference(src, b, GREEDY)
    ref_a = _reference(src, a, GREEDY)
    src.kv.pool.evict_all_cached()
    src.add_request("a", a, GREEDY)
    _steps(src, 2)
    src.add_request("b", b, GREEDY)  # reuses a's 8 prompt blocks from the prefix cache
    _steps(src, 3)
    assert src.stats().prefill_tokens_reused >= 32
    shared_ids = src.kv.block_table("b")[:8]
    assert shared_ids == src.kv.block_table("a")[:8]
    final = migrate_in_process(src, dst, "a", max_stages=3)
    # b still holds the shared blocks: the export freed only a's reference
    assert src.kv.block_table("b")[:8] == shared_ids
    assert all(src.kv.pool.blocks[i].ref_cnt == 1 for i in shared_ids)
    out_b = _run(src, "b")
    out_a = _run(dst, "a")
    assert out_a == ref_a and out_b == ref_b
    assert len(final.output_token_ids) >= 3
    _no_leaks(src, dst)


def test_destination_out_of_blocks_aborts_and_the_request_continues(src, llama):
    small = _engine(llama, blocks=6)
    prompt = _prompt(40, seed=6)
    ref = _reference(src, prompt, GREEDY)
    src.add_request("full", prompt, GREEDY)
    _steps(src, 3)
    with pytest.raises(MigrationAborted) as ei:
        migrate_in_process(src, small, "full")
    assert ei.value.reason is AbortReason.DEST_FULL
    _no_leaks(small)
    assert _run(src, "full") == ref  # it went on decoding on the source
    _no_leaks(src)


def test_destination_full_at_the_last_stage_frees_every_stage(src, llama):
    prompt = _prompt(30, seed=8)
    ref = _reference(src, prompt, GREEDY)
    tight = _engine(llama, blocks=20)  # holds the request alone (30 + 40 tokens: 18 blocks)
    src.add_request("late", prompt, GREEDY)
    _steps(src, 2)
    exp = MigrationExport(src, "late")
    imp = MigrationImport(tight, exp.header())
    imp.add_stage(exp.next_stage())  # 7 full blocks
    # another request takes the destination's room meanwhile
    tight.add_request(
        "filler", _prompt(40, seed=15), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    _steps(tight, 1)
    assert tight.kv.num_free_blocks == 3  # 20 - 7 migrated - 10 of the filler
    _steps(src, 12)  # 4 more blocks to copy: they no longer fit
    final = exp.stop_and_copy()
    with pytest.raises(ResourceExhaustedError):
        imp.finish(final)
    imp.abort()
    exp.resume()
    tight.abort("filler")
    _no_leaks(tight)
    assert _run(src, "late") == ref
    _no_leaks(src)


def test_destination_too_small_for_the_whole_request_is_refused_up_front(src, llama):
    """Prompt + max_tokens outgrowing the destination's whole pool would preempt itself forever
    there: refused before anything is copied."""
    small = _engine(llama, blocks=12)
    src.add_request("big", _prompt(20, seed=16), GREEDY)  # 60 tokens: 15 blocks
    _steps(src, 2)
    exp = MigrationExport(src, "big")
    with pytest.raises(ResourceExhaustedError, match="in all"):
        MigrationImport(small, exp.header())
    src.abort("big")
    _no_leaks(src, small)


def test_source_finishing_mid_copy_aborts_cleanly(src, dst):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    src.add_request("short", _prompt(21, seed=9), params)
    _steps(src, 2)
    exp = MigrationExport(src, "short")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    _run(src, "short")
    with pytest.raises(MigrationAborted) as ei:
        exp.next_stage()
    assert ei.value.reason is AbortReason.SOURCE_FINISHED
    imp.abort()
    _no_leaks(src, dst)


def test_cancel_mid_copy_aborts_cleanly(src, dst):
    src.add_request("gone", _prompt(25, seed=10), GREEDY)
    _steps(src, 3)
    exp = MigrationExport(src, "gone")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    src.abort("gone")
    with pytest.raises(MigrationAborted) as ei:
        exp.stop_and_copy()
    assert ei.value.reason is AbortReason.CANCELLED
    imp.abort()
    _no_leaks(src, dst)


def test_cancel_while_paused_frees_the_source(src, dst):
    src.add_request("paused", _prompt(19, seed=11), GREEDY)
    _steps(src, 3)
    exp = MigrationExport(src, "paused")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    exp.stop_and_copy()
    src.abort("paused")  # the client went away during the stop-and-copy
    exp.resume()  # a no-op: nothing left to resume
    imp.abort()
    _no_leaks(src, dst)


@pytest.mark.parametrize("when", ["stage", "final"])
def test_peer_dying_mid_copy_leaks_nothing_and_the_request_continues(src, dst, when):
    """The destination is lost (its side is dropped as its server would on a broken stream);
    the source resumes the request."""
    prompt = _prompt(33, seed=12)
    ref = _reference(src, prompt, SEEDED)
    src.add_request("peer", prompt, SEEDED)
    _steps(src, 4)
    exp = MigrationExport(src, "peer")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    if when == "final":
        exp.stop_and_copy()
    imp.abort()  # destination side: the stream from the source broke
    exp.resume()  # source side: the send failed
    assert _run(src, "peer") == ref
    _no_leaks(src, dst)


def test_source_preempted_mid_copy_aborts(llama, dst):
    tiny = _engine(llama, blocks=20)
    ref = _reference(tiny, _prompt(30, seed=13), GREEDY)
    tiny.add_request("victim", _prompt(30, seed=13), GREEDY, priority=1)
    _steps(tiny, 2)
    exp = MigrationExport(tiny, "victim")
    imp = MigrationImport(dst, exp.header())
    imp.add_stage(exp.next_stage())
    # a more important request grows beside it until the pool is short: the victim is preempted
    tiny.add_request(
        "vip", _prompt(36, seed=14), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    _steps(tiny, 8)
    assert exp.req.num_preemptions > 0
    with pytest.raises(MigrationAborted) as ei:
        exp.next_stage()
    assert ei.value.reason is AbortReason.SOURCE_PREEMPTED
    imp.abort()
    while tiny.has_unfinished():
        for o in tiny.step():
            if o.request_id == "victim" and o.finished:
                assert o.token_ids == ref
    _no_leaks(tiny, dst)


def test_refusals_name_the_problem(src, dst, llama):
    with pytest.raises(KeyError):
        MigrationExport(src, "nope")
    src.add_request("waiting", _prompt(9), GREEDY)  # not stepped: not decoding yet
    with pytest.raises(InvalidRequestError, match="not decoding"):
        MigrationExport(src, "waiting")
    _steps(src, 2)
    exp = MigrationExport(src, "waiting")
    dst.add_request("waiting", _prompt(9), GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        MigrationImport(dst, exp.header())
    dst.abort("waiting")
    from dataclasses import replace

    with pytest.raises(ModelNotFoundError, match="'some-adapter' is not served"):
        MigrationImport(dst, replace(exp.header(), request_id="lora", adapter_id="some-adapter"))
    with pytest.raises(LayoutMismatchError, match="model"):
        MigrationImport(dst, replace(exp.header(), request_id="other", model_id="another-model"))
    src.abort("waiting")
    _no_leaks(src, dst)


@pytest.fixture(scope="module")
def lora_adapters(llama, tmp_path_factory):
    from tests.lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("mig_lora")
    a1 = make_adapter(llama, root / "a1", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=21)
    a2 = make_adapter(llama, root / "a2", r=2, alpha=4, targets=["o_proj"], seed=22)
    return a1, a2


def _lora_engine(path, adapters, max_loras: int = 2) -> LLMEngine:
    from engine.lora import AdapterSpec, LoRAConfig

    lora = LoRAConfig(tuple(AdapterSpec(n, str(p)) for n, p in adapters), max_loras=max_loras)
    return LLMEngine.from_pretrained(
        path, EngineConfig(num_kv_blocks=BLOCKS, block_size=4, max_num_batched_tokens=256), lora=lora
    )


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_lora_request_migrates_with_its_adapter(llama, lora_adapters, params):
    """The adapter travels with the request: the destination serves it and pins a slot; the
    output equals the unmigrated run; the source's slot pin is released with the request."""
    a1, a2 = lora_adapters
    src = _lora_engine(llama, [("a1", a1), ("a2", a2)])
    dst = _lora_engine(llama, [("a1", a1)])
    try:
        prompt = _prompt(29, seed=4)
        src.add_request("ref", prompt, params, adapter_id="a1")
        ref = _run(src, "ref")
        base = _reference(src, prompt, params)
        assert ref != base  # the adapter changes the output
        src.add_request("l1", prompt, params, adapter_id="a1")
        _steps(src, 5)
        final = migrate_in_process(src, dst, "l1", max_stages=2)
        assert final.output_token_ids == ref[: len(final.output_token_ids)]
        assert dst.lora.slots.pins("a1") == 1 and src.lora.slots.pins("a1") == 0
        assert _run(dst, "l1") == ref
        assert dst.lora.slots.pins("a1") == 0
        _no_leaks(src, dst)
    finally:
        src.close()
        dst.close()


def test_a_lora_migration_without_the_adapter_or_a_slot_aborts_cleanly(llama, lora_adapters):
    """A destination that does not serve the adapter refuses before allocating; one whose only
    slot is held by another adapter's running request aborts at the final stage (DEST_FULL),
    frees every stage, and the request goes on decoding on the source."""
    a1, a2 = lora_adapters
    src = _lora_engine(llama, [("a1", a1), ("a2", a2)])
    plain = _engine(llama)
    busy = _lora_engine(llama, [("a1", a1), ("a2", a2)], max_loras=1)
    try:
        prompt = _prompt(26, seed=5)
        src.add_request("ref", prompt, GREEDY, adapter_id="a1")
        ref = _run(src, "ref")
        src.add_request("l2", prompt, GREEDY, adapter_id="a1")
        _steps(src, 4)
        with pytest.raises(ModelNotFoundError, match="'a1' is not served"):
            migrate_in_process(src, plain, "l2")
        _no_leaks(plain)
        busy.add_request(
            "hold", _prompt(12, seed=6), SamplingParams(max_tokens=200, ignore_eos=True), adapter_id="a2"
        )
        _steps(busy, 2)  # a2 pins the only slot
        free_before = busy.kv.num_free_blocks
        with pytest.raises(MigrationAborted) as ei:
            migrate_in_process(src, busy, "l2")
        assert ei.value.reason is AbortReason.DEST_FULL and "LoRA slot" in str(ei.value)
        assert busy.kv.num_free_blocks == free_before and "l2" not in busy._tracked
        assert _run(src, "l2") == ref  # it went on decoding on the source
        busy.abort("hold")
        _no_leaks(src, busy)
    finally:
        for e in (src, plain, busy):
            e.close()
