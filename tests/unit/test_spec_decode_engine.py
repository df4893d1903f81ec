"""Speculative decoding in the engine (#17): prompt-lookup drafts verified in one forward pass.

Every test compares against the same engine without speculation: greedy and seeded runs are
identical token for token (log-probs within 1e-5), on both decode attention paths, through stop
tokens, stop strings and max_tokens inside an accepted run, preemption (recompute and swap),
abort, prefix caching, parallel sampling and the prefill -> decode handoff; drafts are really
accepted (acceptance > 0 asserted) and no KV block leaks or outlives its tokens.
"""

from __future__ import annotations

import pytest
import torch

from engine.block_manager import KVCacheManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRAConfig
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.spec_decode import SpecMethod, SpeculativeConfig
from pdserve.errors import InvalidRequestError

SPEC = SpeculativeConfig(num_speculative_tokens=4, ngram_min=1, ngram_max=3)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.3, seed=11, ignore_eos=True, logprobs=3)
BLOCK_NBYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: layers * (K, V) * block * kv_heads * head_dim * fp32


def _prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    """Repetitive prompts (a short pattern repeated), so prompt lookup finds drafts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pat = torch.randint(3, 320, (4 + 3 * i,), generator=g).tolist()
        out.append((pat * 12)[: 30 + 7 * i])
    return out


def _engine(path, spec: SpeculativeConfig | None = SPEC, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=128, block_size=16, max_num_batched_tokens=256, speculative=spec)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


def _check_blocks(eng: LLMEngine) -> None:
    """A running request holds exactly the blocks of its computed tokens (rejected drafts'
    blocks were freed), and none of its cached blocks holds a token past them."""
    kv = eng.kv
    for req in eng.scheduler.running:
        assert kv.num_held_blocks(req.request_id) == kv.blocks_needed(req.num_computed_tokens)
        assert kv._num_registered.get(req.request_id, 0) <= req.num_computed_tokens // kv.block_size


def _run(eng: LLMEngine, prompts, params: SamplingParams, runs: list | None = None) -> list[RequestOutput]:
    """generate(), checking the block invariant after every step; ``runs`` collects each
    speculative step's verified run as (request id, output index of its first token, tokens)."""
    if runs is not None:
        orig = eng._verified

        def spy(sched, results):
            out = orig(sched, results)
            for s in sched.scheduled:
                if s.spec_token_ids and s.request.request_id in out:
                    runs.append(
                        (s.request.request_id, s.request.num_output_tokens, out[s.request.request_id])
                    )
            return out

        eng._verified = spy  # type: ignore[method-assign]
    ids = [eng.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    final: dict[str, RequestOutput] = {}
    lps: dict[str, list] = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            lps[o.request_id].extend(o.logprobs)
            if o.finished:
                o.logprobs = lps[o.request_id]
                final[o.request_id] = o
        _check_blocks(eng)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # nothing leaked
    return [final[i] for i in ids]


def _same(a: list[RequestOutput], b: list[RequestOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason and x.stop_reason == y.stop_reason
        assert x.text == y.text
        assert len(x.logprobs) == len(y.logprobs)
        for p, q in zip(x.logprobs, y.logprobs, strict=True):
            assert p.token_id == q.token_id and abs(p.logprob - q.logprob) <= 1e-5
            assert [t for t, _ in p.top] == [t for t, _ in q.top] and len(p.top) == len(q.top) > 0


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def plain(llama):
    """Greedy and seeded outputs without speculation."""
    eng = _engine(llama, None)
    return {"greedy": _run(eng, _prompts(), GREEDY), "seeded": _run(eng, _prompts(), SEEDED)}


# ---------------------------------------------------------------------------- configuration
def test_unsupported_combinations_are_refused_naming_them(llama, tiny_models):
    with pytest.raises(ValueError, match="speculative must be a SpeculativeConfig"):
        EngineConfig(speculative="ngram")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="draft_model is only used with method draft_model"):
        EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.NGRAM, draft_model="/m"))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative=SPEC, tensor_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="LoRA"):
        LLMEngine.from_pretrained(
            llama, EngineConfig(num_kv_blocks=16, speculative=SPEC), lora=LoRAConfig(max_lora_rank=4)
        )
    with pytest.raises(InvalidRequestError, match="sliding"):
        _engine(tiny_models["mistral_swa"])


# ---------------------------------------------------------------------------- scheduler (pure)
def test_scheduler_schedules_drafts_within_budget_and_blocks_and_rolls_back():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    s = Scheduler(
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=64),
        kv,
        drafter=lambda r, n: [9, 9, 9, 9][:n],
    )
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=9, temperature=0.0))
    s.add_request(req)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 3 and not out.scheduled[0].spec_token_ids  # prefill
    s.update_from_output(out, {"a": 5})
    out = s.schedule()  # decode at position 3 with 4 drafts: positions 3..7, two blocks
    (sr,) = out.scheduled
    assert sr.spec_token_ids == (9, 9, 9, 9) and sr.num_new_tokens == 5 and sr.samples
    assert kv.num_held_blocks("a") == 2
    s.update_from_output(out, {"a": (9, 7)})  # one draft kept, then the target's 7
    assert req.output_token_ids == [5, 9, 7] and req.num_computed_tokens == 5
    assert kv.num_held_blocks("a") == 2  # position 4 opened block 1: kept
    out = s.schedule()
    # max_tokens 9, 3 emitted: at most 5 drafts would fit, the drafter gives 4; blocks: 5 + 5 = 10
    # tokens need 3 blocks, all the pool has
    assert out.scheduled[0].num_new_tokens == 5
    with pytest.raises(ValueError, match="does not follow the drafts"):
        s.update_from_output(out, {"a": (8, 7)})
    s.update_from_output(out, {"a": (3,)})  # every draft rejected
    assert req.num_computed_tokens == 6 and kv.num_held_blocks("a") == 2  # block 2 freed
    # another running request takes the last free block: no room for a's drafts, and speculation
    # never preempts (b would be the victim): both run a plain decode
    other = Request("b", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))
    assert kv.allocate_slots(other, 3)
    other.num_computed_tokens = 3
    other.output_token_ids.append(4)
    s.add_running(other)
    assert kv.num_free_blocks == 0
    out = s.schedule()
    got = sorted((x.request.request_id, x.num_new_tokens, x.spec_token_ids) for x in out.scheduled)
    assert got == [("a", 1, ()), ("b", 1, ())]
    assert s.num_preemptions == 0


def test_scheduler_never_drafts_past_max_tokens_or_budget():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    s = Scheduler(
        SchedulerConfig(max_num_batched_tokens=3, max_model_len=64), kv, drafter=lambda r, n: [9] * n
    )
    req = Request("a", [1, 2], SamplingParams(max_tokens=3, temperature=0.0))
    s.add_request(req)
    s.update_from_output(s.schedule(), {"a": 5})
    out = s.schedule()
    assert out.scheduled[0].spec_token_ids == (9,)  # max_tokens 3, 1 emitted: 1 draft + 1 bonus
    done = s.update_from_output(out, {"a": (9, 4)})
    assert done == [req] and req.output_token_ids == [5, 9, 4]
    assert kv.num_free_blocks == 16


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "gather-path"])
def test_greedy_and_seeded_identical_to_plain_decoding(llama, plain, native):
    eng = _engine(llama)
    if not native:
        eng.runner.native_decode = False  # decodes (and speculative steps) take the torch path
    elif not eng.runner.native_decode:
        pytest.fail("the native decode kernel is unavailable on this machine")
    _same(_run(eng, _prompts(), GREEDY), plain["greedy"])
    assert eng.stats().spec_accepted_tokens > 0
    assert eng.num_steps < len(_prompts()) * GREEDY.max_tokens  # fewer steps than tokens
    before = eng.stats().spec_accepted_tokens
    _same(_run(eng, _prompts(), SEEDED), plain["seeded"])
    assert eng.stats().spec_accepted_tokens > before


def test_mixed_sliding_window_model_identical(tiny_models):
    path = tiny_models["qwen2_swa"]  # layer 1 windowed: no block is freed, speculation allowed
    prompts = _prompts(3, seed=4)
    ref = _run(_engine(path, None), prompts, GREEDY)
    eng = _engine(path)
    _same(_run(eng, prompts, GREEDY), ref)
    assert eng.stats().spec_accepted_tokens > 0


def _inside_run(runs, rid: str, upto: int) -> bool:
    """Whether a verified run of ``rid`` covered output index ``upto`` before its last token."""
    return any(r == rid and start <= upto < start + len(toks) - 1 for r, start, toks in runs)


def test_stop_token_and_max_tokens_inside_an_accepted_run(llama, plain):
    runs: list = []
    _run(_engine(llama), _prompts(), GREEDY, runs)
    # an output index inside a run (not its last token); min_tokens = j + 1 makes its token the
    # first that stops (an earlier occurrence is below min_tokens)
    cand = next(
        (
            (i, j)
            for i, o in enumerate(plain["greedy"])
            for j in range(1, 39)
            if _inside_run(runs, f"r{i}", j)
        ),
        None,
    )
    assert cand is not None, "no run to stop inside"
    i, j = cand
    t = plain["greedy"][i].token_ids[j]
    params = SamplingParams(
        max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(t,), min_tokens=j + 1
    )
    ref = _run(_engine(llama, None), [_prompts()[i]], params)
    runs2: list = []
    got = _run(_engine(llama), [_prompts()[i]], params, runs2)
    _same(got, ref)
    assert got[0].token_ids == plain["greedy"][i].token_ids[: j + 1] and got[0].stop_reason == t
    assert _inside_run(runs2, "r0", j)  # the stop really cut an accepted run
    # max_tokens ending where a run would continue: drafts are capped, nothing past it is emitted
    params = SamplingParams(max_tokens=j + 1, temperature=0.0, ignore_eos=True)
    got = _run(_engine(llama), [_prompts()[i]], params)
    assert (
        got[0].token_ids == plain["greedy"][i].token_ids[: j + 1] and got[0].finish_reason.value == "length"
    )


# ---------------------------------------------------------------------------- KV lifecycle
def test_preemption_recompute_and_swap_identical_and_leak_free(llama, plain):
    prompts = _prompts()
    eng = _engine(llama, num_kv_blocks=9)  # cannot hold four sequences of ~70-110 tokens
    _same(_run(eng, prompts, GREEDY), plain["greedy"])
    st = eng.stats()
    assert st.num_preemptions > 0 and st.spec_accepted_tokens > 0
    eng = _engine(llama, num_kv_blocks=9, swap_space_bytes=64 * BLOCK_NBYTES)
    _same(_run(eng, prompts, SEEDED), plain["seeded"])
    st = eng.stats()
    assert st.num_swap_outs > 0 and st.spec_accepted_tokens > 0
    assert eng.kv.num_free_host_blocks == eng.kv.num_host_blocks


def test_abort_mid_speculation_frees_every_block(llama):
    eng = _engine(llama)
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", p, GREEDY)
    while eng.stats().spec_accepted_tokens == 0:
        eng.step()
    eng.abort("r1")
    eng.abort("r3")
    while eng.has_unfinished():
        eng.step()
        _check_blocks(eng)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_prefix_cache_holds_only_kept_tokens(llama, plain):
    """A follow-up prompt made of a first request's prompt and output reuses its cached blocks
    (blocks written by speculative steps included) and decodes what an engine without a cache
    decodes."""
    eng = _engine(llama)
    p0 = _prompts()[3]
    first = _run(eng, [p0], GREEDY)[0]
    assert first.token_ids == plain["greedy"][3].token_ids
    follow = p0 + first.token_ids[:-1]
    got = _run(eng, [follow], GREEDY)[0]
    assert got.num_cached_tokens >= (len(follow) - 1) // 16 * 16 > len(p0)
    ref = _run(_engine(llama, None, enable_prefix_caching=False), [follow], GREEDY)[0]
    _same([got], [ref])


def test_parallel_sampling_and_disaggregated_decode_identical(llama):
    params = SamplingParams(max_tokens=24, temperature=0.3, seed=5, ignore_eos=True, n=2)
    prompt = _prompts()[2]
    ref = _engine(llama, None).generate_choices(prompt, params)
    eng = _engine(llama)
    got = eng.generate_choices(prompt, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    # prefill on a plain engine, decode on a speculative one == the whole plain engine
    pre = _engine(llama, None)
    pre.add_request("x", prompt, GREEDY, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    exp = pre.export_kv("x")
    dec = _engine(llama)
    dec.import_kv("x", exp.token_ids, exp.first_token, exp.blocks, GREEDY, shape=exp.shape)
    toks = [exp.first_token]
    while dec.has_unfinished():
        for o in dec.step():
            toks.extend(o.new_token_ids)
    assert toks == _engine(llama, None).generate([prompt], GREEDY)[0].token_ids
    assert dec.stats().spec_accepted_tokens > 0
    assert dec.kv.num_free_blocks == dec.kv.num_blocks


# ---------------------------------------------------------------------------- SmolLM2
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n\ndef"
EXTRACT = (
    "Customers: Alice Smith (alice@example.com), Bob Jones (bob@example.com), Carol White "
    "(carol@example.com).\nList every customer's email address, one per line:\n"
)


@pytest.fixture(scope="module")
def smol(smollm_path):
    cfg = dict(num_kv_blocks=64, block_size=16, max_num_batched_tokens=256)
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(**cfg)), LLMEngine.from_pretrained(
        smollm_path, EngineConfig(**cfg, speculative=SPEC)
    )


def test_smollm_greedy_seeded_and_stop_string_inside_a_run(smol):
    plain_eng, spec_eng = smol
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    seeded = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.95, seed=3, logprobs=2)
    runs: list = []
    ref = _run(plain_eng, [CODE, EXTRACT], greedy)
    _same(_run(spec_eng, [CODE, EXTRACT], greedy, runs), ref)
    assert spec_eng.stats().spec_accepted_tokens > 0
    _same(_run(spec_eng, [CODE], seeded), _run(plain_eng, [CODE], seeded))
    # a stop string completed by a token inside an accepted run: the run is cut there
    tok = plain_eng.tokenizer
    i, j = next((i, j) for i in range(2) for j in range(1, 23) if _inside_run(runs, f"r{i}", j))
    out = ref[i].token_ids
    before, upto = tok.decode(out[:j]), tok.decode(out[: j + 1])
    stop = next(upto[-m:] for m in range(1, len(upto) + 1) if upto[-m:] not in before)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))
    prompt = [CODE, EXTRACT][i]
    runs2: list = []
    got = _run(spec_eng, [prompt], params, runs2)
    _same(got, _run(plain_eng, [prompt], params))
    assert got[0].token_ids == out[: j + 1] and got[0].stop_reason == stop
    assert _inside_run(runs2, "r0", j)


def test_repetition_penalty_sees_the_drafts_before_each_position(llama):
    """Position j of a verification step is sampled with the history a plain decode would have
    there (the kept drafts before it included)."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, repetition_penalty=1.05)
    prompts = _prompts(3, seed=2)
    eng = _engine(llama)
    _same(_run(eng, prompts, params), _run(_engine(llama, None), prompts, params))
    assert eng.stats().spec_accepted_tokens > 0
