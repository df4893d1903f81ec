"""Multi-LoRA serving vs transformers + peft (the reference), fp32 on CPU.

Greedy tokens with an adapter == peft's; log-probs within 1e-3; == the adapter merged into the
weights; a batch mixing 4 adapters and the base model (prefill chunks and decodes in the same
steps) == each request alone; eviction and reload (slots and host tier) give the same output;
the prefix cache never serves one adapter's KV to another.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from tests.lora_adapters import (
    hf_greedy,
    hf_logprobs,
    make_adapter,
    make_tiny_llama,
    peft_reference,
    save_merged,
)

LOGPROB_TOL = 1e-3
N_GEN = 12

# (name, r, alpha, targets, rslora, rank_pattern, alpha_pattern)
TINY_ADAPTERS = [
    ("qv", 4, 8, ["q_proj", "v_proj", "down_proj"], False, None, None),
    ("all", 8, 16, "all-linear", True, {"o_proj": 2}, {"gate_proj": 4}),
    ("regex", 2, 3, r".*\.(k_proj|up_proj)", False, None, None),
    ("mlp16", 16, 32, ["o_proj", "gate_proj", "up_proj"], False, {"layers.1.mlp.up_proj": 4}, None),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_golden")
    base = make_tiny_llama(root)
    paths = {}
    for i, (name, r, alpha, targets, rslora, rp, ap) in enumerate(TINY_ADAPTERS):
        paths[name] = make_adapter(
            base,
            root / name,
            r=r,
            alpha=alpha,
            targets=targets,
            rslora=rslora,
            rank_pattern=rp,
            alpha_pattern=ap,
            seed=10 + i,
        )
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (7, 40, 90)]
    return root, base, paths, prompts


def _lora(paths, **kw) -> LoRAConfig:
    return LoRAConfig(tuple(AdapterSpec(n, str(p)) for n, p in paths.items()), **kw)


def _run(eng: LLMEngine, reqs: list[tuple[list[int], str]], params: SamplingParams):
    """Submit every (prompt, adapter) at once; returns the final outputs in order (logprobs cumulative)."""
    ids = [eng.add_request(None, p, params, adapter_id=a) for p, a in reqs]
    final, lps = {}, {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            lps[o.request_id].extend(o.logprobs)
            if o.finished:
                o.logprobs = lps[o.request_id]
                final[o.request_id] = o
    return [final[i] for i in ids]


PARAMS = SamplingParams(max_tokens=N_GEN, temperature=0.0, ignore_eos=True, logprobs=0)


def _lp(out) -> torch.Tensor:
    return torch.tensor([lp.logprob for lp in out.logprobs])


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    _, base, paths, _ = tiny
    return LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=512), lora=_lora(paths)
    )


def test_tiny_adapters_match_peft(tiny, tiny_engine):
    _, base, paths, prompts = tiny
    base_outs = _run(tiny_engine, [(p, "") for p in prompts], PARAMS)
    for name, path in paths.items():
        ref = peft_reference(base, path)
        outs = _run(tiny_engine, [(p, name) for p in prompts], PARAMS)
        for p, out in zip(prompts, outs, strict=True):
            want = hf_greedy(ref, p, N_GEN)
            assert out.token_ids == want, name
            assert torch.allclose(_lp(out), hf_logprobs(ref, p, want), atol=LOGPROB_TOL), name
        assert any(o.token_ids != b.token_ids for o, b in zip(outs, base_outs, strict=True)), (
            f"{name} changes nothing"
        )


def test_lora_on_both_linear_backends_matches_peft(tiny, tiny_engine):
    """The default engine (linear 'auto') runs each adapted projection's base on the native fp32
    kernel (LoRALinear wraps NativeLinear; the low-rank update stays in torch); linear 'torch'
    keeps nn.Linear. Both give peft's greedy tokens."""
    from engine.lora.layers import LoRALinear
    from engine.models import linear_native as ln

    _, base, paths, prompts = tiny
    wrapped = [m for m in tiny_engine.runner.model.modules() if isinstance(m, LoRALinear)]
    assert wrapped
    if ln.kernel() is not None:
        assert all(type(m.base) is ln.NativeLinear for m in wrapped)
    eng = LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=256, linear="torch"), lora=_lora({"all": paths["all"]})
    )
    assert all(
        type(m.base) is torch.nn.Linear for m in eng.runner.model.modules() if isinstance(m, LoRALinear)
    )
    ref = peft_reference(base, paths["all"])
    for p, out in zip(prompts, _run(eng, [(p, "all") for p in prompts], PARAMS), strict=True):
        want = hf_greedy(ref, p, N_GEN)
        assert out.token_ids == want
        assert torch.allclose(_lp(out), hf_logprobs(ref, p, want), atol=LOGPROB_TOL)


def test_tiny_adapters_match_merged_weights(tiny, tiny_engine):
    root, base, paths, prompts = tiny
    for name in ("qv", "all"):
        merged = LLMEngine.from_pretrained(
            save_merged(base, paths[name], root / f"merged_{name}"), EngineConfig(num_kv_blocks=256)
        )
        want = _run(merged, [(p, "") for p in prompts], PARAMS)
        got = _run(tiny_engine, [(p, name) for p in prompts], PARAMS)
        for w, o in zip(want, got, strict=True):
            assert o.token_ids == w.token_ids
            assert torch.allclose(_lp(o), _lp(w), atol=LOGPROB_TOL)


def test_mixed_batch_equals_each_alone(tiny):
    """4 adapters + base in one batch, with a small token budget so prefill chunks and decodes
    of different adapters share steps (chunked prefill)."""
    _, base, paths, prompts = tiny
    eng = LLMEngine.from_pretrained(
        base,
        EngineConfig(num_kv_blocks=256, max_num_batched_tokens=32, long_prefill_token_threshold=16),
        lora=_lora(paths),
    )
    names = ["", *paths]
    reqs = [(prompts[i % len(prompts)], names[i % len(names)]) for i in range(10)]
    # what each forward held: the adapters ("" = base) of its prefill chunks and of its decodes
    steps: list[tuple[set[str], set[str]]] = []
    begin = eng.lora.begin_step

    def recording(scheduled):
        pre = {
            s.request.adapter_id
            for s in scheduled
            if s.start + s.num_new_tokens <= len(s.request.prompt_token_ids)
        }
        dec = {s.request.adapter_id for s in scheduled} - pre
        steps.append((pre, dec))
        return begin(scheduled)

    eng.lora.begin_step = recording
    together = _run(eng, reqs, PARAMS)
    eng.lora.begin_step = begin
    mixed_steps = eng.num_steps
    # one forward served every adapter and the base model together, and some forward mixed one
    # adapter's prefill chunk with other adapters' decodes (chunked prefill)
    assert any(len(pre | dec) == len(names) for pre, dec in steps), steps
    assert any(pre and dec and len(pre | dec) >= 3 for pre, dec in steps), steps
    for req, out in zip(reqs, together, strict=True):
        alone = _run(eng, [req], PARAMS)[0]
        assert out.token_ids == alone.token_ids, req[1]
        assert torch.allclose(_lp(out), _lp(alone), atol=1e-4)
    assert mixed_steps < sum(len(p) for p, _ in reqs)  # they did share steps


def test_eviction_and_reload_same_output(tiny, tiny_engine):
    """2 engine slots, 2 adapters in host memory, 4 adapters: slots are evicted and adapters
    re-read from disk (in the background) while other requests run; outputs never change."""
    _, base, paths, prompts = tiny
    ref = {n: _run(tiny_engine, [(prompts[1], n)], PARAMS)[0].token_ids for n in paths}
    eng = LLMEngine.from_pretrained(
        base,
        EngineConfig(num_kv_blocks=256, enable_prefix_caching=False),
        lora=_lora(paths, max_loras=2, max_cpu_loras=2),
    )
    order = ["qv", "all", "regex", "mlp16", "qv", "regex", "all", "mlp16"]
    for n in order:
        assert _run(eng, [(prompts[1], n)], PARAMS)[0].token_ids == ref[n], n
    # all four at once with two slots: two wait for a slot, none runs on the wrong weights
    outs = _run(eng, [(prompts[1], n) for n in paths] + [(prompts[1], "")], PARAMS)
    for n, o in zip(paths, outs[:-1], strict=True):
        assert o.token_ids == ref[n], n
    st = eng.lora.stats
    assert st.slot_evictions >= 6 and st.disk_loads > len(paths) and st.host_evictions > 0
    assert len(eng.lora.host_resident()) <= 2
    assert eng.stats().num_waiting == 0 and eng.stats().kv_blocks_used == 0


def test_prefix_cache_never_shared_across_adapters(tiny, tiny_engine):
    p = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(99)).tolist()  # 5 full blocks
    fresh = {n: _run(tiny_engine, [(p, n)], PARAMS)[0] for n in ("qv", "all")}  # caches qv's and all's blocks
    again_qv = _run(tiny_engine, [(p, "qv")], PARAMS)[0]
    assert again_qv.num_cached_tokens == 80 and again_qv.token_ids == fresh["qv"].token_ids
    for other in ("regex", ""):
        out = _run(tiny_engine, [(p, other)], PARAMS)[0]
        assert out.num_cached_tokens == 0, other
    h_qv = tiny_engine.prefix_hashes(p, "qv")
    assert tiny_engine.num_local_prefix_blocks(h_qv) == 5
    assert set(h_qv).isdisjoint(tiny_engine.prefix_hashes(p, "all"))
    assert set(h_qv).isdisjoint(tiny_engine.prefix_hashes(p, ""))


def test_prefill_then_decode_roles_with_adapter(tiny, tiny_engine):
    """Disaggregated: prefill engine (prefill_only) -> export -> decode engine import == whole."""
    _, base, paths, prompts = tiny
    p = prompts[1]
    whole = _run(tiny_engine, [(p, "all")], PARAMS)[0]
    pre = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=64), lora=_lora(paths))
    dec = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=64), lora=_lora(paths))
    pre.add_request("r", p, PARAMS, adapter_id="all", prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    kv = pre.export_kv("r")
    pre.release("r")
    assert pre.lora.slots.pins("all") == 0
    dec.import_kv("r", p, kv.first_token, kv.blocks, PARAMS, adapter_id="all", first_logprob=kv.first_logprob)
    toks = [kv.first_token]
    while dec.has_unfinished():
        for o in dec.step():
            toks.extend(o.new_token_ids)
    assert toks == whole.token_ids
    assert dec.lora.slots.pins("all") == 0


@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma3_text"])
def test_other_families_match_peft(family, tmp_path):
    """Phi-3 (fused qkv_proj / gate_up_proj targets, PEFT's names for them), Qwen3 (q/k norms
    after the projections) and Gemma 3 text: engine with the adapter == peft."""
    from transformers import Gemma3TextConfig, Phi3Config, Qwen3Config

    from tests.tiny_models import COMMON, random_model

    if family == "phi3":
        cfg = Phi3Config(**COMMON, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        targets: list[str] | str = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    elif family == "qwen3":
        cfg = Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False)
        targets = "all-linear"
    else:  # local/global layers, four norms, GeGLU, logit soft-capping
        cfg = Gemma3TextConfig(
            **{**COMMON, "tie_word_embeddings": True},
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=20,
            final_logit_softcapping=5.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    model = random_model(cfg, 1)
    base = tmp_path / family
    model.save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, alpha=8, targets=targets, seed=3)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=64), lora=_lora({"a": adapter}))
    ref = peft_reference(base, adapter)
    p = list(range(5, 40))
    out, base_out = _run(eng, [(p, "a"), (p, "")], PARAMS)
    want = hf_greedy(ref, p, N_GEN)
    assert out.token_ids == want
    assert torch.allclose(_lp(out), hf_logprobs(ref, p, want), atol=LOGPROB_TOL)
    assert out.token_ids != base_out.token_ids


@pytest.mark.slow
def test_smollm2_adapters_match_peft(smollm_path, tmp_path_factory):
    """Two adapters (attention r=8; MLP r=4 rsLoRA with a per-module rank) served together in
    one batch with the base model: each == peft (tokens, log-probs) and == peft's merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora_smol")
    adapters = {
        "attn": make_adapter(
            smollm_path,
            root / "attn",
            r=8,
            alpha=16,
            targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            seed=3,
            std=0.03,
        ),
        "mlp_rs": make_adapter(
            smollm_path,
            root / "mlp_rs",
            r=4,
            alpha=8,
            targets=["gate_proj", "up_proj", "down_proj"],
            rslora=True,
            rank_pattern={"down_proj": 2},
            seed=4,
            std=0.05,
        ),
    }
    eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256), lora=_lora(adapters))
    p = AutoTokenizer.from_pretrained(smollm_path)("The capital of France is")["input_ids"]
    n = 8
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
    base_out, *outs = _run(eng, [(p, ""), *((p, a) for a in adapters)], params)
    base_hf = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    assert base_out.token_ids == hf_greedy(base_hf, p, n)
    for name, out in zip(adapters, outs, strict=True):
        ref = peft_reference(smollm_path, adapters[name])
        want = hf_greedy(ref, p, n)
        assert out.token_ids == want, name
        assert torch.allclose(_lp(out), hf_logprobs(ref, p, want), atol=LOGPROB_TOL), name
        # the adapter really acts (its log-probs of the same tokens are not the base model's)
        assert (_lp(out) - hf_logprobs(base_hf, p, out.token_ids)).abs().max() > 1e-2, name
        merged = ref.merge_and_unload()
        assert torch.allclose(_lp(out), hf_logprobs(merged, p, want), atol=LOGPROB_TOL), name
