"""Parallel sampling across the prefill/decode handoff, in the real engine (tiny random Llama,
fp32, CPU): a prefill engine runs ``prompt[:-1]`` prefill-only (what the prefill worker does for
a group), a decode engine adopts its KV with ``import_kv_group`` and forks the choices; every
choice equals the whole engine's choice and the request run alone with ``seed + i``; the
EngineLoop closes a group's stream only after its last choice; nothing leaks."""

from __future__ import annotations

import queue
from dataclasses import replace

import pytest
import torch

from engine.config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import CancelledError, InvalidRequestError, LayoutMismatchError, ResourceExhaustedError

BS = 16
PARAMS = SamplingParams(max_tokens=8, temperature=1.0, top_k=40, seed=11, logprobs=1, ignore_eos=True, n=3)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path, blocks: int = 64) -> LLMEngine:
    return LLMEngine.from_pretrained(
        path, EngineConfig(num_kv_blocks=blocks, block_size=BS, max_num_batched_tokens=256)
    )


@pytest.fixture(scope="module")
def engines(tiny_models):
    p = tiny_models["llama"]
    return _engine(p), _engine(p), _engine(p)  # prefill, decode, whole


def _prefill_prefix(eng: LLMEngine, rid: str, prompt: list[int]) -> torch.Tensor:
    """The prefill worker's part: ``prompt[:-1]`` prefill-only, its KV exported and released."""
    eng.add_request(rid, prompt[:-1], SamplingParams.greedy_params(1, ignore_eos=True), prefill_only=True)
    while eng.has_unfinished():
        eng.step()
    kv = eng.export_kv(rid)
    eng.release(rid)
    assert kv.token_ids == prompt[:-1]
    return kv.blocks


def _run_to_end(eng: LLMEngine, rid: str, n: int):
    final, lps = {}, {}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            lps.setdefault(o.choice_index, []).extend(o.logprobs)
            if o.finished:
                o.logprobs = lps[o.choice_index]
                final[o.choice_index] = o
    assert sorted(final) == list(range(n))
    return [final[i] for i in range(n)]


@pytest.mark.parametrize("plen", [37, 33, 2])  # partial shared block; exact blocks; 1-token prefix
def test_handed_off_group_equals_whole_engine_and_each_choice_alone(engines, plen):
    pre, dec, whole = engines
    prompt = _prompt(plen, plen)
    free = dec.kv.num_free_blocks
    blocks = _prefill_prefix(pre, f"p{plen}", prompt)
    rid = dec.import_kv_group(f"g{plen}", prompt, blocks, PARAMS)
    assert dec.has_request(rid)
    got = _run_to_end(dec, rid, 3)
    ref = whole.generate_choices(prompt, PARAMS)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.choice_index == b.choice_index == i
        assert a.token_ids == b.token_ids
        assert [lp.token_id for lp in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
        alone = whole.generate([prompt], replace(PARAMS, n=1, seed=PARAMS.seed + i))[0]
        assert a.token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in got}) > 1
    assert not dec.has_unfinished() and not dec._groups and not dec._tracked
    assert dec.kv.num_free_blocks == free


def test_best_of_after_handoff_returns_the_ranked_n(engines):
    pre, dec, whole = engines
    prompt = _prompt(30, 4)
    params = replace(PARAMS, n=2, best_of=4, logprobs=None, seed=5)
    blocks = _prefill_prefix(pre, "pb", prompt)
    rid = dec.import_kv_group("gb", prompt, blocks, params)
    got = _run_to_end(dec, rid, 2)
    ref = whole.generate_choices(prompt, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert got[0].cumulative_logprob >= got[1].cumulative_logprob


def test_import_group_refusals_change_nothing(engines, tiny_models):
    pre, dec, _ = engines
    prompt = _prompt(20, 1)
    blocks = _prefill_prefix(pre, "pr", prompt)
    free = dec.kv.num_free_blocks
    with pytest.raises(InvalidRequestError, match="import_kv"):
        dec.import_kv_group("x", prompt, blocks, replace(PARAMS, n=1))
    with pytest.raises(InvalidRequestError, match="2 tokens"):
        dec.import_kv_group("x", prompt[:1], blocks[:0], PARAMS)
    with pytest.raises(LayoutMismatchError, match="does not fit"):
        dec.import_kv_group("x", prompt + [5] * 20, blocks, PARAMS)
    small = _engine(tiny_models["llama"], blocks=3)  # 2 prefix blocks + 3 choices > 3: never
    with pytest.raises(InvalidRequestError, match="3 choices over a 19-token shared prompt need 5 KV blocks"):
        small.import_kv_group("x", prompt, blocks, PARAMS)
    assert small.kv.num_free_blocks == 3 and not small._groups
    busy = _engine(tiny_models["llama"], blocks=6)  # 5 fit the pool, not while 2 are taken: retry later
    busy.add_request("hog", list(range(5, 30)), SamplingParams(max_tokens=2, ignore_eos=True))
    busy.step()
    with pytest.raises(ResourceExhaustedError, match="needs 5"):
        busy.import_kv_group("x", prompt, blocks, PARAMS)
    assert not busy._groups
    # room for the group's start (5 blocks), not for one choice's whole run (20 + 100 tokens: 8)
    six = _engine(tiny_models["llama"], blocks=6)
    with pytest.raises(InvalidRequestError, match="plus max_tokens 100 needs 8 KV blocks"):
        six.import_kv_group("x", prompt, blocks, replace(PARAMS, max_tokens=100))
    assert six.kv.num_free_blocks == 6 and not six._groups and not six.scheduler.requests
    assert dec.kv.num_free_blocks == free and not dec._groups and not dec._tracked


def test_engine_loop_closes_a_group_stream_after_its_last_choice(engines):
    pre, dec, _ = engines
    prompt = _prompt(25, 9)
    blocks = _prefill_prefix(pre, "pl", prompt)
    free = dec.kv.num_free_blocks
    loop = EngineLoop(dec, name="test-group-loop")
    try:
        q = loop.add("gl", lambda e: e.import_kv_group("gl", prompt, blocks, PARAMS), num_choices=3)
        finished, tokens = [], {0: [], 1: [], 2: []}
        while len(finished) < 3:
            item = q.get(timeout=60)
            assert not isinstance(item, BaseException)
            tokens[item.choice_index].extend(item.new_token_ids)
            if item.finished:
                finished.append(item.choice_index)
        assert sorted(finished) == [0, 1, 2]
        assert all(len(t) == PARAMS.max_tokens for t in tokens.values())
        with pytest.raises(queue.Empty):
            q.get(timeout=0.2)  # closed: nothing after the last choice
        assert "gl" not in loop._queues and "gl" not in loop._choices_left
        # aborting a group mid-way ends its stream once, with every choice's blocks freed
        blocks2 = _prefill_prefix(pre, "pl2", prompt)
        q2 = loop.add(
            "ga",
            lambda e: e.import_kv_group("ga", prompt, blocks2, replace(PARAMS, max_tokens=200)),
            num_choices=3,
        )
        first = q2.get(timeout=60)
        assert not isinstance(first, BaseException)
        assert loop.abort("ga") is True
        items = [first]
        while not isinstance(items[-1], BaseException):
            items.append(q2.get(timeout=60))
        assert isinstance(items[-1], CancelledError)
        assert loop.call(lambda e: (e.kv.num_free_blocks, bool(e._groups), bool(e._tracked))) == (
            free,
            False,
            False,
        )
    finally:
        loop.stop()
