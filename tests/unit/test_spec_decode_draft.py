"""Draft-model speculative decoding (#17): engine.spec_decode.draft_model and .rejection.

Coupled acceptance (default): greedy and seeded output identical to the engine without
speculation (tokens, log-probs within 1e-5), with the target itself as its own draft (every draft
accepted) and with another random model of the same vocabulary (few accepted), on both decode
attention paths, through preemption (recompute and swap), abort, prefix caching and the
prefill -> decode handoff; the draft KV pool never holds a sequence of a request that is not
running and is empty at the end. Rejection acceptance: the emitted tokens' joint distribution is
the target's (chi-square on a 4-token vocabulary Markov model), and seeded engine runs repeat.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRAConfig
from engine.outputs import RequestOutput
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.spec_decode import DraftAcceptance, SpecMethod, SpeculativeConfig
from engine.spec_decode.rejection import rejection_sample
from pdserve.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=32, temperature=0.8, seed=11, ignore_eos=True, logprobs=2)
HOT = SamplingParams(max_tokens=32, temperature=1.5, seed=7, ignore_eos=True)


def _spec(draft, acceptance=DraftAcceptance.COUPLED, k: int = 4) -> SpeculativeConfig:
    return SpeculativeConfig(
        method=SpecMethod.DRAFT_MODEL, draft_model=str(draft), num_speculative_tokens=k, acceptance=acceptance
    )


def _prompts(n: int = 3, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (20 + 9 * i,), generator=g).tolist() for i in range(n)]


def _engine(path, spec: SpeculativeConfig | None, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=64, block_size=16, max_num_batched_tokens=256, speculative=spec)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


def _check_draft(eng: LLMEngine) -> None:
    """The draft pool holds sequences of running requests only, each at most its tokens plus
    the drafts of one step."""
    d = eng.draft
    if d is None:
        return
    running = {r.request_id: r for r in eng.scheduler.running if r.status is RequestStatus.RUNNING}
    assert set(d._seqs) <= set(running)
    k = eng.config.speculative.num_speculative_tokens
    for rid in d._seqs:
        assert d.kv.num_held_blocks(rid) <= d.kv.blocks_needed(running[rid].num_tokens + k)


def _run(eng: LLMEngine, prompts, params: SamplingParams) -> list[RequestOutput]:
    ids = [eng.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    final: dict[str, RequestOutput] = {}
    lps: dict[str, list] = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            lps[o.request_id].extend(o.logprobs)
            if o.finished:
                o.logprobs = lps[o.request_id]
                final[o.request_id] = o
        _check_draft(eng)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    if eng.draft is not None:  # nothing of the draft outlives its requests
        assert eng.draft.num_sequences == 0 and eng.draft.kv.num_free_blocks == eng.draft.kv.num_blocks
    return [final[i] for i in ids]


def _same(a: list[RequestOutput], b: list[RequestOutput], tol: float = 1e-5) -> None:
    """Same tokens and finish; log-probs within ``tol`` (SmolLM2: 1e-4, a verification step's
    multi-row matmuls sum in another order than a one-row decode's)."""
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        assert len(x.logprobs) == len(y.logprobs)
        for p, q in zip(x.logprobs, y.logprobs, strict=True):
            assert p.token_id == q.token_id and abs(p.logprob - q.logprob) <= tol


def _rate(eng: LLMEngine) -> float:
    st = eng.stats()
    return st.spec_accepted_tokens / max(st.spec_draft_tokens, 1)


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def plain(llama):
    eng = _engine(llama, None)
    return {
        "greedy": _run(eng, _prompts(), GREEDY),
        "seeded": _run(eng, _prompts(), SEEDED),
        "hot": _run(eng, _prompts(), HOT),
    }


# ---------------------------------------------------------------------------- configuration
def test_draft_model_configuration_and_refusals(llama, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="draft_model: set"):
        SpeculativeConfig(method=SpecMethod.DRAFT_MODEL)
    with pytest.raises(ValueError, match="acceptance 'rejection' is only for method draft_model"):
        SpeculativeConfig(acceptance=DraftAcceptance.REJECTION)
    with pytest.raises(ValueError, match="acceptance must be one of"):
        SpeculativeConfig(method=SpecMethod.DRAFT_MODEL, draft_model="/m", acceptance="rejection")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative=_spec(llama), tensor_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="LoRA"):
        LLMEngine.from_pretrained(
            llama, EngineConfig(num_kv_blocks=16, speculative=_spec(llama)), lora=LoRAConfig(max_lora_rank=4)
        )
    other = tmp_path / "other_vocab"
    shutil.copytree(llama, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": 321}))
    with pytest.raises(InvalidRequestError, match="vocab_size 321"):
        _engine(llama, _spec(other))
    (other / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    with pytest.raises(InvalidRequestError, match="reaches 64 positions"):
        _engine(llama, _spec(other))
    with pytest.raises(InvalidRequestError, match="draft_model"):
        _engine(llama, _spec(tmp_path / "missing"))


# ---------------------------------------------------------------------------- exactness (coupled)
@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "gather-path"])
def test_self_draft_accepts_everything_and_output_is_identical(llama, plain, native):
    eng = _engine(llama, _spec(llama))
    if not native:
        eng.runner.native_decode = False
        eng.draft.runner.native_decode = False
    _same(_run(eng, _prompts(), GREEDY), plain["greedy"])
    assert _rate(eng) >= 0.95  # the target as its own draft: (nearly) every draft is kept
    assert eng.num_steps <= 3 + len(_prompts()) * GREEDY.max_tokens // 4  # ~k+1 tokens per step
    _same(_run(eng, _prompts(), SEEDED), plain["seeded"])
    assert _rate(eng) >= 0.95


def test_other_draft_model_coupled_seeded_and_greedy_identical(llama, tiny_models, plain):
    """A different random model of the same vocabulary: few greedy drafts agree, but at a high
    temperature the coupled draws often do; every output token is still the target's own."""
    eng = _engine(llama, _spec(tiny_models["qwen2"]))
    _same(_run(eng, _prompts(), GREEDY), plain["greedy"])
    _same(_run(eng, _prompts(), HOT), plain["hot"])
    assert eng.stats().spec_accepted_tokens > 0


# ---------------------------------------------------------------------------- KV lifecycle
def test_preemption_recompute_and_swap_identical_and_leak_free(llama, plain):
    eng = _engine(llama, _spec(llama), num_kv_blocks=7)  # cannot hold three sequences of 52-70 tokens
    _same(_run(eng, _prompts(), GREEDY), plain["greedy"])
    assert eng.stats().num_preemptions > 0 and eng.stats().spec_accepted_tokens > 0
    blk = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama's KV block in bytes
    eng = _engine(llama, _spec(llama), num_kv_blocks=7, swap_space_bytes=64 * blk)
    _same(_run(eng, _prompts(), SEEDED), plain["seeded"])
    assert eng.stats().num_swap_outs > 0 and eng.stats().spec_accepted_tokens > 0


def test_abort_frees_the_draft_kv(llama):
    eng = _engine(llama, _spec(llama))
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", p, GREEDY)
    while eng.stats().spec_accepted_tokens == 0:
        eng.step()
    assert eng.draft.num_sequences == 3
    eng.abort("r1")
    assert "r1" not in eng.draft._seqs
    while eng.has_unfinished():
        eng.step()
        _check_draft(eng)
    assert eng.draft.num_sequences == 0 and eng.draft.kv.num_free_blocks == eng.draft.kv.num_blocks


def test_prefix_cache_handoff_and_parallel_sampling_identical(llama, plain):
    eng = _engine(llama, _spec(llama))
    p0 = _prompts()[2]
    first = _run(eng, [p0], GREEDY)[0]
    assert first.token_ids == plain["greedy"][2].token_ids
    follow = p0 + first.token_ids[:-1]  # reuses blocks written by verification steps
    got = _run(eng, [follow], GREEDY)[0]
    assert got.num_cached_tokens >= (len(follow) - 1) // 16 * 16 > len(p0)
    _same([got], _run(_engine(llama, None, enable_prefix_caching=False), [follow], GREEDY))
    # prefill on a plain engine, decode on a draft-model engine == the whole plain engine
    pre = _engine(llama, None)
    pre.add_request("x", p0, SEEDED, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    exp = pre.export_kv("x")
    dec = _engine(llama, _spec(llama))
    dec.import_kv("x", exp.token_ids, exp.first_token, exp.blocks, SEEDED, shape=exp.shape)
    toks = [exp.first_token]
    while dec.has_unfinished():
        for o in dec.step():
            toks.extend(o.new_token_ids)
        _check_draft(dec)
    assert toks == plain["seeded"][2].token_ids
    assert dec.stats().spec_accepted_tokens > 0 and dec.draft.num_sequences == 0
    # parallel sampling: each choice drafts with its own draft sequence
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=5, ignore_eos=True, n=2)
    ref = _engine(llama, None).generate_choices(p0, params)
    got = dec.generate_choices(p0, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert dec.draft.num_sequences == 0 and dec.draft.kv.num_free_blocks == dec.draft.kv.num_blocks


# ---------------------------------------------------------------------------- rejection sampling
def test_rejection_sampling_keeps_the_target_distribution():
    """A 4-token Markov 'target' A and 'draft' B (next-token distributions given the previous
    token): generating two tokens after token 0 by speculative steps (k = 2, drafts x ~ B) gives
    the joint A[0, y0] * A[y0, y1] (chi-square, 15 dof), and drafts are kept about 1 - TV."""
    torch.manual_seed(0)
    V = 4
    A = torch.softmax(torch.randn(V, V) * 1.5, dim=-1)
    B = torch.softmax(torch.randn(V, V) * 1.5, dim=-1)
    n = 12000
    counts = torch.zeros(V, V)
    kept = drafted = 0
    g = torch.Generator().manual_seed(1)
    for seed in range(n):
        out: list[int] = []
        prev = 0
        while len(out) < 2:
            x0 = int(torch.multinomial(B[prev], 1, generator=g))
            x1 = int(torch.multinomial(B[x0], 1, generator=g))
            p = torch.stack([A[prev], A[x0], A[x1]])
            q = torch.stack([B[prev], B[x0]])
            bonus = int(torch.multinomial(A[x1], 1, generator=g))
            toks, acc = rejection_sample(p, q, [x0, x1], bonus, seed, len(out))
            assert toks[:acc] == [x0, x1][:acc] and len(toks) == acc + 1
            if acc == 0:
                assert toks[0] != x0  # a replacement never equals the rejected draft
            kept += acc
            drafted += 2
            out.extend(toks)
            prev = out[-1]
        counts[out[0], out[1]] += 1
    expect = n * A[0].unsqueeze(1) * A
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 45.0, chi2  # 15 dof: P(chi2 > 45) ~ 1e-4
    tv = 0.5 * (A - B).abs().sum(dim=-1)  # acceptance per position lies between the rows' 1 - TV
    assert float((1 - tv).min()) - 0.05 < kept / drafted < float((1 - tv).max()) + 0.05


def test_rejection_acceptance_in_the_engine_is_seeded_and_reproducible(llama, tiny_models, plain):
    spec = _spec(tiny_models["qwen2"], DraftAcceptance.REJECTION)
    a = _engine(llama, spec)
    first = _run(a, _prompts(), HOT)
    st = a.stats()
    assert 0 < st.spec_accepted_tokens < st.spec_draft_tokens  # kept and rejected drafts both
    again = _run(_engine(llama, spec), _prompts(), HOT)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert all(len(o.token_ids) == HOT.max_tokens for o in first)
    # greedy requests keep matching drafts only: identical to plain decoding under rejection too
    _same(_run(a, _prompts(), GREEDY), plain["greedy"])
    # rejection keeps at least as many drafts as the coupled rule (1 - TV vs (1 - TV) / (1 + TV))
    c = _engine(llama, _spec(tiny_models["qwen2"]))
    _run(c, _prompts(), HOT)
    assert st.spec_accepted_tokens / st.spec_draft_tokens >= 0.8 * _rate(c)


# ---------------------------------------------------------------------------- SmolLM2
def test_smollm_with_a_tiny_draft_of_its_vocabulary(smollm_path, tmp_path):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer drafts for SmolLM2: output
    identical greedy and seeded; a tiny model with another tokenizer is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    d = tmp_path / "draft"
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_path / f, d / f)
    kw = dict(num_kv_blocks=32, block_size=16, max_num_batched_tokens=256, max_model_len=2048)
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef"
    plain_eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(**kw))
    spec_eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(**kw, speculative=_spec(d)))
    for params in (
        SamplingParams(max_tokens=8, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=0.9, seed=3, logprobs=1),
    ):
        _same(_run(spec_eng, [code], params), _run(plain_eng, [code], params), tol=1e-4)
    assert spec_eng.stats().spec_draft_tokens > 0
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {
        t: (i + 1) % len(tok["model"]["vocab"]) for t, i in tok["model"]["vocab"].items()
    }
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidRequestError, match="another tokenizer"):
        LLMEngine.from_pretrained(smollm_path, EngineConfig(**kw, speculative=_spec(d)))
