"""Fused native small ops (engine.models.fused_native) and the model's fused forward (issue #17):
each kernel against the torch ops it replaces, the engine with the fused forward against the same
engine with torch's ops and against transformers (greedy identical, log-probs within 1e-3), the
selection rule, and the native attention kernel's serial/parallel split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import attention_native
from engine.attention import write_kv
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models import fused_native as fn
from engine.models.llama import RMSNorm
from engine.models.rope import apply_rotary
from engine.sampling_params import SamplingParams
from tests.unit.test_golden_hf import LOGPROB_TOL, PROMPTS, _hf_greedy, _hf_logprobs

pytestmark = [
    pytest.mark.skipif(not fn.available(), reason=f"no C compiler: {fn.unavailable_reason()}"),
]


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rmsnorm_equals_torch(rows, with_x):
    g = torch.Generator().manual_seed(rows)
    res = torch.randn(rows, 576, generator=g) * 3
    x = torch.randn(rows, 576, generator=g) if with_x else None
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
    want_res = res + x if with_x else res.clone()
    with torch.no_grad():
        want = norm(want_res)
    got_res = res.clone()
    got = fn.add_rmsnorm(x, got_res, norm.weight.detach(), norm.eps)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)  # the add is the same fp32 add
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
def test_rope_qkv_equals_apply_rotary_and_write_kv(rows):
    h, kvh, hd, bs, nb = 9, 3, 64, 16, 6
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (h + 2 * kvh) * hd, generator=g)
    pos = torch.randint(0, 200, (rows,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.outer(torch.arange(256).float(), inv)
    emb = torch.cat([emb, emb], -1)
    cos, sin = emb.cos(), emb.sin()
    slots = torch.randperm(nb * bs, generator=g)[:rows]
    q0, k0, v0 = qkv.split([h * hd, kvh * hd, kvh * hd], -1)
    want_q = apply_rotary(q0.reshape(rows, h, hd), cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    want_k = apply_rotary(k0.reshape(rows, kvh, hd), cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    want_cache = torch.zeros(2, nb, bs, kvh, hd)
    write_kv(want_cache, want_k, v0.reshape(rows, kvh, hd), slots)
    cache = torch.zeros(2, nb, bs, kvh, hd)
    got = qkv.clone()
    q = fn.rope_qkv(got, h, kvh, hd, pos, cos, sin, cache, slots)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        got[:, h * hd : (h + kvh) * hd].view(rows, kvh, hd), want_k, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(cache, want_cache, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:, (h + kvh) * hd :], v0)  # v untouched
    # no cache: rotation only
    got2 = qkv.clone()
    torch.testing.assert_close(fn.rope_qkv(got2, h, kvh, hd, pos, cos, sin), q, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 5])
def test_silu_mul_equals_torch(rows):
    g = torch.Generator().manual_seed(rows)
    gu = torch.randn(rows, 2 * 1536, generator=g) * 4
    gu[0, 0] = -100.0  # exp overflow side: silu -> -0
    gu[0, 1] = 100.0
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(fn.silu_mul(gu), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_kernels_refuse_bad_tensors():
    cos = sin = torch.zeros(16, 8)
    qkv = torch.zeros(2, (2 + 2) * 8)
    with pytest.raises(IndexError, match="positions"):
        fn.rope_qkv(qkv, 2, 1, 8, torch.tensor([0, 16]), cos, sin)
    with pytest.raises(IndexError, match="slots"):
        fn.rope_qkv(
            qkv, 2, 1, 8, torch.tensor([0, 1]), cos, sin, torch.zeros(2, 1, 4, 1, 8), torch.tensor([0, 4])
        )
    with pytest.raises(ValueError, match="int64"):
        fn.rope_qkv(qkv, 2, 1, 8, torch.tensor([0, 1], dtype=torch.int32), cos, sin)
    with pytest.raises(ValueError, match="needs slots"):
        fn.rope_qkv(qkv, 2, 1, 8, torch.tensor([0, 1]), cos, sin, torch.zeros(2, 1, 4, 1, 8))
    with pytest.raises(ValueError, match="float32"):
        fn.silu_mul(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        fn.silu_mul(torch.zeros(8, 2).t())
    with pytest.raises(ValueError, match="odd"):
        fn.silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="weight"):
        fn.add_rmsnorm(None, torch.zeros(2, 8), torch.zeros(4), 1e-5)


@pytest.mark.parametrize("par_min", [0, 10**9])
def test_attention_serial_split_is_bitwise_the_parallel_result(monkeypatch, par_min):
    """PAR_MIN_WORK only chooses how many threads run the (query, KV head) items: same bits."""
    g = torch.Generator().manual_seed(3)
    nb, bs, kvh, hd, h, t = 12, 16, 3, 64, 9, 4
    kc, vc = torch.randn(nb, bs, kvh, hd, generator=g), torch.randn(nb, bs, kvh, hd, generator=g)
    q = torch.randn(t, h, hd, generator=g)
    tables = torch.randperm(nb, generator=g)[:8].view(2, 4).contiguous()
    row = torch.tensor([0, 0, 1, 1])
    lo, hi, first = (
        torch.tensor([0, 5, 0, 40]),
        torch.tensor([30, 64, 7, 50]),
        torch.zeros(4, dtype=torch.long),
    )
    monkeypatch.setattr(attention_native, "PAR_MIN_WORK", 0)
    ref = attention_native.paged_attention_rows(q, kc, vc, tables, row, lo, hi, first, 0.125)
    monkeypatch.setattr(attention_native, "PAR_MIN_WORK", par_min)
    got = attention_native.paged_attention_rows(q, kc, vc, tables, row, lo, hi, first, 0.125)
    assert torch.equal(got, ref)


ARCHS = ["llama", "llama3_rope", "qwen2_swa", "mistral_swa", "llama_gelu_bias"]


@pytest.fixture(scope="module")
def fused_engines(tiny_models):
    cfg = dict(num_kv_blocks=256, max_num_batched_tokens=512, linear="native")
    out = {}
    for arch in ARCHS:
        fused = LLMEngine.from_pretrained(tiny_models[arch], EngineConfig(**cfg))
        assert fused.runner.fused_reason is None and fused.runner.model.fused
        plain = LLMEngine.from_pretrained(tiny_models[arch], EngineConfig(**cfg))
        plain.runner.model.enable_fused(False)
        out[arch] = (fused, plain)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_engine_fused_equals_torch_ops_and_hf(tiny_models, fused_engines, arch):
    """4 prompts decode together (decode rows: the direct native attention call), prefills of 5
    and 37 rows (the fused forward with paged_attention) and 100..200 (torch's ops)."""
    from transformers import AutoModelForCausalLM

    fused, plain = fused_engines[arch]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 37, 100, 200)]
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0)
    a = fused.generate(prompts, sp, use_tqdm=False)
    b = plain.generate(prompts, sp, use_tqdm=False)
    for ids, x, y in zip(prompts, a, b, strict=True):
        assert x.token_ids == y.token_ids == _hf_greedy(hf, ids, 40)
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        torch.testing.assert_close(lx, ly, atol=LOGPROB_TOL, rtol=0)
        torch.testing.assert_close(lx, _hf_logprobs(hf, ids, x.token_ids), atol=LOGPROB_TOL, rtol=0)


def test_fused_forward_equals_torch_ops_with_speculative_rows(tiny_models):
    """Prompt-lookup speculation: several decode rows per request over one table, causal within
    the new tokens (K/V of every row written before attention reads): output equals no fusion."""
    from engine.spec_decode.config import SpeculativeConfig

    spec = SpeculativeConfig(num_speculative_tokens=3, ngram_min=1, ngram_max=3)
    cfg = dict(num_kv_blocks=256, linear="native", speculative=spec)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7] * 3, [9, 10, 11] * 7]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    fused = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(**cfg))
    plain = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(**cfg))
    plain.runner.model.enable_fused(False)
    assert fused.runner.model.fused
    a = fused.generate(prompts, sp, use_tqdm=False)
    b = plain.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        torch.testing.assert_close(lx, ly, atol=LOGPROB_TOL, rtol=0)


def test_selection_follows_the_native_linear(tiny_models):
    torch_lin = LLMEngine.from_pretrained(
        tiny_models["llama"], EngineConfig(num_kv_blocks=64, linear="torch")
    )
    assert torch_lin.runner.fused_reason == "the projections do not use the native linear"
    assert not torch_lin.runner.model.fused
    gelu = LLMEngine.from_pretrained(
        tiny_models["llama_gelu_bias"], EngineConfig(num_kv_blocks=64, linear="native")
    )
    assert gelu.runner.fused_reason is None and gelu.runner.model.fused  # GELU-tanh has a kernel
    gelu.runner.model.model.layers[1].mlp.act = F.relu
    assert "layer 1's activation relu has no fused kernel" in gelu.runner.model.fused_unsupported_reason()
    with pytest.raises(ValueError, match="activation relu has no fused kernel"):
        gelu.runner.model.enable_fused()
    model = torch_lin.runner.model
    assert model.fused_unsupported_reason() is None  # it could run; the selection keeps it off
    model.to(torch.float64)
    assert "float64" in model.fused_unsupported_reason()


@pytest.mark.slow
def test_smollm2_fused_equals_torch_ops_and_hf(smollm_path):
    """The 8 golden prompts x 32 greedy tokens, decoded together (8 rows) and one at a time."""
    from transformers import AutoModelForCausalLM

    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    fused = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512, linear="native"))
    assert fused.runner.fused_reason is None
    a = fused.generate(PROMPTS, sp, use_tqdm=False)
    one = [fused.generate([p], sp, use_tqdm=False)[0] for p in PROMPTS[:2]]
    fused.runner.model.enable_fused(False)
    b = fused.generate(PROMPTS, sp, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    worst = 0.0
    for i, (prompt, x, y) in enumerate(zip(PROMPTS, a, b, strict=True)):
        assert x.token_ids == y.token_ids
        ids = fused.tokenize(prompt)
        assert x.token_ids == _hf_greedy(hf, ids, 32)
        if i < len(one):
            assert one[i].token_ids == x.token_ids
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        ref = _hf_logprobs(hf, ids, x.token_ids)
        worst = max(worst, (lx - ly).abs().max().item(), (lx - ref).abs().max().item())
    print(f"fused vs torch ops/HF: max |delta logprob| {worst:.2e}")
    assert worst <= LOGPROB_TOL
