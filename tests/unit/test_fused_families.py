"""The fused native forward (issue #17) on the families beyond plain Llama: Qwen3 (per-head q/k
RMSNorm), Phi-3 (checkpoint-fused qkv/gate_up, partial rotary, LongRoPE tables, every layer
windowed), Gemma 3 (GELU-tanh, (1 + w) norms, four norms per layer, q/k norms, local/global RoPE,
logit cap) and Gemma 2 (attention score soft-cap, alternating windows), and the int8 weight-only
path.

* The new kernel variants against the torch modules they replace.
* Golden, per family: the engine with the fused forward against the same engine with torch's ops
  and against transformers (greedy identical, log-probs within 1e-3), with chunked prefill
  (chunks of 16: fused forward over paged_attention) and decode-only steps (the direct native
  attention call), then a round from prefix-cache hits.
* int8: fused == unfused on the same int8 weights (greedy identical, log-probs within 1e-3; the
  int8 path's own tolerance against fp32 is tests/unit/test_quant.py's).
* What the fused forward does not cover is named (``fused_reason``), never run.

Tiny random-weight checkpoints as in tests/unit/test_models_families.py (every 1-d weight
randomised, so a missing norm or bias shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models import fused_native as fn
from engine.models.gemma3 import GemmaRMSNorm
from engine.models.llama import RMSNorm, _gelu_new, _gelu_tanh
from engine.models.rope import apply_rotary
from tests.tiny_models import save_random_models
from tests.unit import test_models_families as fam
from tests.unit import test_models_gemma2_longrope as g2

pytestmark = [
    pytest.mark.skipif(not fn.available(), reason=f"no C compiler: {fn.unavailable_reason()}"),
]

ARCHS = ["qwen3", "phi3", "gemma3", "gemma2", "phi3_longrope"]
TOL = 1e-3


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("rot", [64, 32])
def test_rope_qkv_with_qk_norm_and_partial_rotary_equals_torch(gemma, rot):
    h, kvh, hd, rows = 6, 2, 64, 3
    g = torch.Generator().manual_seed(rot + gemma)
    qkv = torch.randn(rows, (h + 2 * kvh) * hd, generator=g) * 2
    pos = torch.tensor([0, 7, 199])
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    emb = torch.outer(torch.arange(256).float(), inv)
    emb = torch.cat([emb, emb], -1)
    cos, sin = emb.cos(), emb.sin()
    norm_cls = GemmaRMSNorm if gemma else RMSNorm
    qn, kn = norm_cls(hd, 1e-6), norm_cls(hd, 1e-6)
    with torch.no_grad():
        qn.weight.copy_(torch.randn(hd, generator=g) * 0.3 + (0 if gemma else 1))
        kn.weight.copy_(torch.randn(hd, generator=g) * 0.3 + (0 if gemma else 1))
        q0, k0, v0 = qkv.split([h * hd, kvh * hd, kvh * hd], -1)
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        want_q = apply_rotary(qn(q0.reshape(rows, h, hd)), c, s)
        want_k = apply_rotary(kn(k0.reshape(rows, kvh, hd)), c, s)
    got = qkv.clone()
    q = fn.rope_qkv(
        got, h, kvh, hd, pos, cos, sin, q_weight=qn.weight.detach(), k_weight=kn.weight.detach(),
        norm_eps=1e-6, plus_one=gemma,
    )  # fmt: skip
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got[:, h * hd : (h + kvh) * hd].view(rows, kvh, hd), want_k, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(got[:, (h + kvh) * hd :], v0, rtol=0, atol=0)  # v untouched


def test_rope_qkv_refuses_odd_or_wide_tables():
    qkv = torch.zeros(1, 4 * 8)
    for width in (3, 10):
        with pytest.raises(ValueError, match="R even"):
            fn.rope_qkv(qkv, 2, 1, 8, torch.tensor([0]), torch.zeros(4, width), torch.zeros(4, width))
    with pytest.raises(ValueError, match="q_weight"):
        fn.rope_qkv(
            qkv, 2, 1, 8, torch.tensor([0]), torch.zeros(4, 8), torch.zeros(4, 8), q_weight=torch.ones(4)
        )


@pytest.mark.parametrize("rows", [1, 4])
def test_gemma_sandwich_add_rmsnorm_equals_torch(rows):
    """res += post_norm(x); out = next_norm(res), both (1 + w) norms: Gemma's residual step."""
    d = 96
    g = torch.Generator().manual_seed(rows)
    res, x = torch.randn(rows, d, generator=g) * 2, torch.randn(rows, d, generator=g) * 5
    post, nxt = GemmaRMSNorm(d, 1e-6), GemmaRMSNorm(d, 1e-5)
    with torch.no_grad():
        post.weight.copy_(torch.randn(d, generator=g) * 0.5)
        nxt.weight.copy_(torch.randn(d, generator=g) * 0.5)
        want_res = res + post(x)
        want = nxt(want_res)
    got_res = res.clone()
    got = fn.add_rmsnorm(
        x, got_res, nxt.weight.detach(), nxt.eps, x_weight=post.weight.detach(), x_eps=post.eps, plus_one=True
    )
    torch.testing.assert_close(got_res, want_res, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x_weight without x"):
        fn.add_rmsnorm(None, res.clone(), nxt.weight.detach(), 1e-5, x_weight=post.weight.detach())


@pytest.mark.parametrize("ref", [_gelu_tanh, _gelu_new])
def test_gelu_tanh_mul_equals_torch(ref):
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(3, 2 * 640, generator=g) * 4
    gu[0, :4] = torch.tensor([-100.0, 100.0, -9.0, 9.0])
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(fn.act_mul(gu, fn.Act.GELU_TANH), ref(gate) * up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fn.act_mul(gu, fn.Act.SILU), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    configs = {k: v for k, v in fam._configs().items() if k in [*ARCHS, "mixtral"]}
    configs |= {k: v for k, v in g2._configs().items() if k in ARCHS}
    return save_random_models(tmp_path_factory.mktemp("fused_families"), configs)


def _engine(path: Path, fused: bool, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=128, max_num_batched_tokens=40, block_size=8, long_prefill_token_threshold=16)
    base.update(kw)
    eng = LLMEngine.from_pretrained(path, EngineConfig(**base))
    if fused:
        assert eng.runner.fused_reason is None, eng.runner.fused_reason
        assert eng.runner.model.fused
    else:
        eng.runner.model.enable_fused(False)
    return eng


def _logprobs(out) -> torch.Tensor:
    return torch.tensor([lp.logprob for lp in out.logprobs])


def _rounds(eng: LLMEngine) -> list:
    """Prompts of 5, 37 and 100 tokens (chunks of 16, decodes alongside), then two from prefix hits."""
    first = fam._prompts((5, 37, 100), seed=1)
    a = eng.generate(first, fam.GREEDY)
    second = [first[2][:64] + fam._prompts((11,), seed=2)[0], first[2][:96] + fam._prompts((3,), seed=3)[0]]
    b = eng.generate(second, fam.GREEDY)
    assert [o.num_cached_tokens for o in b] == [64, 96]
    assert eng.kv.num_used_blocks == 0
    return list(zip(first + second, a + b, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_family_equals_torch_ops_and_hf(models, arch):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    kw = dict(linear="native", max_model_len=g2.OMAX if arch == "phi3_longrope" else None)
    fused = _rounds(_engine(models[arch], True, **kw))
    plain = _rounds(_engine(models[arch], False, **kw))
    for (ids, x), (_, y) in zip(fused, plain, strict=True):
        toks, ref = fam._hf_ref(hf, ids, fam.GREEDY.max_tokens)
        assert x.token_ids == y.token_ids == toks
        torch.testing.assert_close(_logprobs(x), _logprobs(y), atol=TOL, rtol=0)
        torch.testing.assert_close(_logprobs(x), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3"])
def test_int8_fused_equals_int8_unfused(models, arch):
    """The int8 projections (native int8 kernel up to 16 rows, dequantise + GEMM above) under
    the fused small ops give the unfused int8 engine's tokens and log-probs."""
    fused = _rounds(_engine(models[arch], True, weight_dtype="int8"))
    plain = _rounds(_engine(models[arch], False, weight_dtype="int8"))
    for (_, x), (_, y) in zip(fused, plain, strict=True):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(_logprobs(x), _logprobs(y), atol=TOL, rtol=0)


def test_uncovered_structures_are_named(models):
    """What the fused forward does not reproduce is refused with its name, never run."""
    from engine.models.qwen3 import Qwen3ForCausalLM

    eng = _engine(models["qwen3"], True, linear="native")
    model = eng.runner.model
    attn = model.model.layers[1].self_attn
    attn.k_norm.eps = attn.q_norm.eps * 2
    assert model.fused_unsupported_reason() == "layer 1's q_norm and k_norm have different eps"
    attn.k_norm.eps = attn.q_norm.eps
    norm = model.model.layers[0].post_attention_layernorm
    model.model.layers[0].post_attention_layernorm = torch.nn.LayerNorm(norm.weight.shape[0])
    assert "layer 0's post_attention_layernorm is LayerNorm" in model.fused_unsupported_reason()
    model.model.layers[0].post_attention_layernorm = GemmaRMSNorm(norm.weight.shape[0], norm.eps)
    assert model.fused_unsupported_reason() == "a mixture of RMSNorm and GemmaRMSNorm norms"
    model.model.layers[0].post_attention_layernorm = norm
    assert model.fused_unsupported_reason() is None

    class OwnForward(Qwen3ForCausalLM):
        def forward(self, *args):
            raise AssertionError("not called")

    model.__class__ = OwnForward
    assert "has its own forward" in model.fused_unsupported_reason()
    with pytest.raises(ValueError, match="own forward"):
        model.enable_fused()


def test_mixture_of_experts_is_named(models):
    eng = LLMEngine.from_pretrained(models["mixtral"], EngineConfig(num_kv_blocks=64))
    assert eng.runner.fused_reason == "the projections do not use the native linear"
    assert "SparseMoE" in eng.runner.model.fused_unsupported_reason()
