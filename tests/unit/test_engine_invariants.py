"""Engine invariants: batching, chunking, prefix caching, preemption and KV export/import
never change the tokens produced (tiny random Llama model, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 17, 40, 64, 90, 130, 33, 8][:n]
    return [torch.randint(3, 320, (k,), generator=g).tolist() for k in lens]


def _engine(path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=256, block_size=16, max_num_batched_tokens=512)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def reference(llama):
    """Each prompt run alone on a roomy, unchunked engine."""
    eng = _engine(llama, enable_prefix_caching=False)
    return [eng.generate([p], GREEDY)[0].token_ids for p in _prompts()]


def test_batched_equals_alone(llama, reference):
    outs = _engine(llama).generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_chunked_prefill_equals_unchunked(llama, reference):
    eng = _engine(llama, max_num_batched_tokens=24, long_prefill_token_threshold=16)
    outs = eng.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert eng.num_steps > len(reference) + GREEDY.max_tokens  # the long prompts really were chunked


def test_decodes_never_skipped_while_prefills_wait(llama):
    """Sarathi: once a request decodes, every step schedules it until it finishes."""
    eng = _engine(llama, max_num_batched_tokens=20, long_prefill_token_threshold=16)
    ps = _prompts()
    eng.add_request("first", ps[0], GREEDY)
    while not eng.scheduler.requests["first"].output_token_ids:
        eng.step()
    for i, p in enumerate(ps[1:]):
        eng.add_request(f"r{i}", p, GREEDY)
    while "first" in eng.scheduler.requests:
        sched = eng.scheduler.schedule()
        assert "first" in {s.request.request_id for s in sched.scheduled}
        assert sched.num_prefill_tokens > 0 or not eng.scheduler.waiting
        results = eng.runner.execute(sched)
        eng.scheduler.update_from_output(sched, {k: v.token for k, v in results.items()})


def test_prefix_cache_hit_same_output_fewer_tokens(llama):
    eng = _engine(llama)
    shared = _prompts()[5]  # 130 tokens
    a = eng.generate([shared + [5, 6, 7]], GREEDY)[0]
    computed_before = eng.stats().prefill_tokens_computed
    b = eng.generate([shared + [5, 6, 7]], GREEDY)[0]
    computed = eng.stats().prefill_tokens_computed - computed_before
    assert b.token_ids == a.token_ids
    assert b.num_cached_tokens == 128  # 8 full blocks of 16
    assert computed == len(shared) + 3 - 128
    fresh = _engine(llama, enable_prefix_caching=False).generate([shared + [5, 6, 7]], GREEDY)[0]
    assert fresh.token_ids == a.token_ids


def test_tenant_salt_isolates_prefix_cache(llama):
    eng = _engine(llama)
    p = _prompts()[5]
    eng.add_request("a", p, GREEDY, cache_salt="tenant-a")
    while eng.has_unfinished():
        eng.step()
    eng.add_request("b", p, GREEDY, cache_salt="tenant-b")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].num_cached_tokens == 0


def test_preemption_and_resume_identical(llama, reference):
    # 20 blocks of 16 tokens cannot hold all six sequences at once: some are preempted and recomputed
    eng = _engine(llama, num_kv_blocks=20)
    outs = eng.generate(_prompts(), GREEDY)
    assert eng.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert eng.kv.num_free_blocks == 20


def test_no_block_leaks_after_abort(llama):
    eng = _engine(llama, num_kv_blocks=64)
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", p, GREEDY)
    eng.step()
    eng.step()
    for i in range(6):
        eng.abort(f"r{i}")
    assert not eng.has_unfinished()
    assert eng.kv.num_free_blocks == 64


def test_export_import_round_trip_exact(llama, reference):
    pre = _engine(llama)
    dec = _engine(llama, num_kv_blocks=128)
    for i, p in enumerate(_prompts()):
        pre.add_request(f"r{i}", p, GREEDY, prefill_only=True)
    firsts = {}
    while pre.has_unfinished():
        for o in pre.step():
            assert o.finished and len(o.token_ids) == 1
            firsts[o.request_id] = o.token_ids[0]
    for i, p in enumerate(_prompts()):
        kv = pre.export_kv(f"r{i}")
        assert kv.first_token == firsts[f"r{i}"] == reference[i][0]
        assert len(kv.block_hashes) == kv.blocks.shape[0] == -(-len(p) // 16)
        dec.import_kv(f"r{i}", p, kv.first_token, kv.blocks, GREEDY, shape=kv.shape, model_id=kv.model_id)
        # the bytes landed exactly: re-exporting them from the decode engine gives the same tensor
        table = dec.kv.block_table(f"r{i}")
        assert torch.equal(dec.runner.export_blocks(table), kv.blocks)
        pre.release(f"r{i}")
    assert pre.kv.num_free_blocks == pre.kv.num_blocks
    got = {}
    while dec.has_unfinished():
        for o in dec.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    assert [got[f"r{i}"] for i in range(6)] == reference
    assert dec.kv.num_free_blocks == 128


def test_import_refuses_mismatched_layout(llama, tiny_models):
    from pdserve.errors import LayoutMismatchError

    pre = _engine(llama)
    other = _engine(tiny_models["qwen2"])
    p = _prompts()[2]
    pre.add_request("x", p, GREEDY, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    kv = pre.export_kv("x")
    with pytest.raises(LayoutMismatchError, match="model"):
        other.import_kv("x", p, kv.first_token, kv.blocks, GREEDY, shape=kv.shape, model_id=kv.model_id)
    bad = kv.blocks[:, :1]
    with pytest.raises(LayoutMismatchError, match="shape"):
        pre.import_kv("y", p, kv.first_token, bad, GREEDY)


def test_seeded_sampling_independent_of_batch(llama):
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    p = _prompts()[3]
    alone = _engine(llama).generate([p], sp)[0].token_ids
    mixed_params = [SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)] * 5 + [sp]
    batch = _engine(llama, max_num_batched_tokens=40).generate(_prompts()[:5] + [p], mixed_params)
    assert batch[-1].token_ids == alone
    other_seed = _engine(llama).generate([p], SamplingParams(max_tokens=16, temperature=0.9, seed=43))[0]
    assert other_seed.token_ids != alone


def test_seeded_sampling_survives_disaggregation(llama):
    sp = SamplingParams(
        max_tokens=16, temperature=1.0, min_p=0.05, repetition_penalty=1.2, seed=3, ignore_eos=True
    )
    p = _prompts()[4]
    whole = _engine(llama).generate([p], sp)[0].token_ids
    pre, dec = _engine(llama), _engine(llama)
    pre.add_request("s", p, sp, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    kv = pre.export_kv("s")
    dec.import_kv("s", p, kv.first_token, kv.blocks, sp, shape=kv.shape)
    toks = [kv.first_token]
    while dec.has_unfinished():
        for o in dec.step():
            toks += o.new_token_ids
    assert toks == whole


@pytest.mark.parametrize("k", [1, 5, 11])
def test_seeded_sampling_resumes_exactly_with_a_position_offset(llama, k):
    """A request moved after k tokens (router failover) is resumed as prompt + those k tokens with
    max_tokens - k and seed_position_offset=k: it samples what the uninterrupted run sampled."""
    sp = SamplingParams(
        max_tokens=16, temperature=1.0, min_p=0.05, repetition_penalty=1.2, seed=5, ignore_eos=True
    )
    p = _prompts()[3]
    whole = _engine(llama).generate([p], sp)[0].token_ids
    resumed_sp = SamplingParams(
        max_tokens=16 - k,
        temperature=1.0,
        min_p=0.05,
        repetition_penalty=1.2,
        seed=5,
        ignore_eos=True,
        seed_position_offset=k,
    )
    rest = _engine(llama).generate([list(p) + whole[:k]], resumed_sp)[0].token_ids
    assert whole[:k] + rest == whole
    unshifted = (
        _engine(llama)
        .generate(
            [list(p) + whole[:k]],
            SamplingParams(
                **{
                    **{
                        f: getattr(resumed_sp, f)
                        for f in ("max_tokens", "temperature", "min_p", "repetition_penalty")
                    },
                    "seed": 5,
                    "ignore_eos": True,
                }
            ),
        )[0]
        .token_ids
    )
    assert unshifted != rest  # without the offset the positions restart: a different sample


def test_priority_admits_important_first(llama):
    eng = _engine(llama, max_num_seqs=1)
    ps = _prompts()
    eng.add_request("low", ps[0], GREEDY, priority=5)
    eng.add_request("high", ps[1], GREEDY, priority=0)
    first = eng.step()
    assert {s.request_id for s in first} <= {"high"}
    assert "high" in eng.scheduler.requests and eng.scheduler.running[0].request_id == "high"
