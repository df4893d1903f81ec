"""Gemma 2 (attention and final logit soft-capping, query_pre_attn_scalar, alternating local/global
layers, four norms) and Phi-3 LongRoPE against transformers 5.23.

Tiny random-weight checkpoints as in tests/unit/test_models_families.py (every 1-d weight
randomised too), built once per module.

* Golden: greedy tokens identical and log-probs within 1e-3 of transformers, with chunked prefill
  (chunks of 16, block size 8) and a second round from prefix-cache hits; Gemma 2 with the native
  in-place decode kernel and with the torch gather path (both soft-cap).
* Soft-capped attention: the native kernel equals the torch path; every torch path (fresh
  prefill, continued prefill, decode) equals a direct eager computation.
* Gemma 2 disaggregated == whole; its tensor-parallel shards add up to the whole model.
* LongRoPE: our cos/sin tables equal transformers' rotary embedding (short factors and attention
  factor); an engine whose max_model_len passes original_max_position_embeddings is refused.
* The tiny configs exercise their features (without each, transformers answers otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine import attention_native
from engine.attention import AttentionMetadata, PrefillSlice, decode_rows, paged_attention
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.config import ModelConfig, UnsupportedModelConfigError
from tests.tiny_models import save_random_models
from tests.unit import test_models_families as fam

WINDOW = 24
ATTN_CAP = 1.0  # scores of the tiny model are O(1): a cap of 1 changes them (test below)
OMAX = 256  # LongRoPE original_max_position_embeddings (max_position_embeddings 512)
SHORT = [1.0, 1.7, 3.1, 6.0]
LONG = [2.0, 4.0, 8.0, 16.0]


def _configs() -> dict:
    from transformers import Gemma2Config, Phi3Config

    return {
        # default layer types: 0 sliding (window 24), 1 full; caps; scalar != head_dim; tied
        "gemma2": Gemma2Config(
            **{**fam.COMMON, "tie_word_embeddings": True},
            head_dim=32,
            sliding_window=WINDOW,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=ATTN_CAP,
            final_logit_softcapping=5.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        # half the head rotated (4 frequencies), factor 512/256 -> attention factor 1.06
        "phi3_longrope": Phi3Config(
            **fam.COMMON | {"max_position_embeddings": 512},
            original_max_position_embeddings=OMAX,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": SHORT,
                "long_factor": LONG,
            },
            pad_token_id=None,
            bos_token_id=1,
            eos_token_id=2,
        ),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_random_models(tmp_path_factory.mktemp("gemma2_longrope"), _configs())


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


def _engine(path: Path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=128, max_num_batched_tokens=40, block_size=8, long_prefill_token_threshold=16)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


def _golden(eng: LLMEngine, model) -> None:
    first = fam._prompts((5, 37, 100), seed=1)
    for ids, out in zip(first, eng.generate(first, fam.GREEDY), strict=True):
        fam._check(out, fam._hf_ref(model, ids, fam.GREEDY.max_tokens))
    second = [first[2][:64] + fam._prompts((11,), seed=2)[0], first[2][:96] + fam._prompts((3,), seed=3)[0]]
    outs = eng.generate(second, fam.GREEDY)
    assert [o.num_cached_tokens for o in outs] == [64, 96]
    for ids, out in zip(second, outs, strict=True):
        fam._check(out, fam._hf_ref(model, ids, fam.GREEDY.max_tokens))
    assert eng.kv.num_used_blocks == 0


def test_gemma2_config_parsed(models) -> None:
    cfg = ModelConfig.from_path(models["gemma2"])
    assert cfg.layer_windows == (WINDOW, None)
    assert cfg.attn_logit_softcapping == ATTN_CAP and cfg.final_logit_softcapping == 5.0
    assert cfg.attn_scale == pytest.approx(20**-0.5) and not cfg.qk_norm and cfg.rope_local is None


@pytest.mark.parametrize("native", [True, False])
def test_gemma2_golden_with_chunked_prefill_and_prefix_hits(models, hf, native) -> None:
    """Prompts of 5, 37, 100 tokens (past the window of 24) in chunks of 16, then prefix hits.
    ``native``: decodes through the in-place C kernel (with the cap) or the torch gather path."""
    eng = _engine(models["gemma2"])
    if native and not eng.runner.native_decode:
        # as tests/unit/test_attention_native.py: a skip only where no C compiler builds the
        # kernel, a failure under CI (.ci/run sets PDSERVE_CI)
        if os.environ.get("PDSERVE_CI"):
            pytest.fail(f"native kernel unavailable: {attention_native.unavailable_reason()}")
        pytest.skip(f"native kernel: {attention_native.unavailable_reason()}")
    eng.runner.native_decode = native
    _golden(eng, hf("gemma2"))


def test_gemma2_disaggregated_equals_whole(models) -> None:
    fam.test_disaggregated_equals_whole(models, "gemma2")


def test_gemma2_tensor_parallel_shards_add_up(models) -> None:
    """Two shards' attention (capped scores, heads split) and MLP outputs sum to the whole's."""
    fam.test_tensor_parallel_shards_add_up(models, "gemma2")


def _eager(q, k, v, qpos, kpos, scale, cap, window):
    """transformers' eager attention with soft-capping, one sequence: q [n, H, d], k/v [L, KVH, d]."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q, kk) * scale
    s = torch.tanh(s / cap) * cap
    mask = kpos[None] <= qpos[:, None]
    if window is not None:
        mask &= kpos[None] > qpos[:, None] - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("window", [None, 6])
def test_softcap_every_torch_path_equals_eager(window) -> None:
    """A fresh prefill (16 tokens), a continued prefill (8 tokens after 16 cached) and a decode
    (position 24) over scattered blocks equal eager soft-capped attention."""
    h, kvh, d, bs, nb, scale, cap = 4, 2, 8, 4, 16, 0.7, 0.9
    gen = torch.Generator().manual_seed(5)
    table = torch.randperm(nb, generator=gen)[:7]
    q, k, v = (torch.randn(25, n, d, generator=gen) * 2 for n in (h, kvh, kvh))
    cache = torch.zeros(2, nb, bs, kvh, d)
    slots = table[torch.arange(25) // bs] * bs + torch.arange(25) % bs
    pos = torch.arange(25)
    want = _eager(q, k, v, pos, pos, scale, cap, window)
    # step 1: fresh prefill of 16
    md = AttentionMetadata(slots[:16], 0, None, None, [PrefillSlice(0, 16, 0, None)], bs)
    got = paged_attention(q[:16], k[:16], v[:16], cache, md, scale, window, cap)
    torch.testing.assert_close(got, want[:16], rtol=1e-5, atol=1e-5)
    # step 2: 8 more after 16 cached
    md = AttentionMetadata(slots[16:24], 0, None, None, [PrefillSlice(0, 8, 16, table[:6])], bs)
    got = paged_attention(q[16:24], k[16:24], v[16:24], cache, md, scale, window, cap)
    torch.testing.assert_close(got, want[16:24], rtol=1e-5, atol=1e-5)
    # step 3: one decode at position 24, gather path
    kpos = torch.arange(7 * bs)
    md = AttentionMetadata(
        slots[24:],
        1,
        table[None],
        (kpos < 25)[None, None, None],
        [],
        bs,
        decode_window_masks={}
        if window is None
        else {window: ((kpos < 25) & (kpos > 24 - window))[None, None, None]},
    )
    got = paged_attention(q[24:], k[24:], v[24:], cache, md, scale, window, cap)
    torch.testing.assert_close(got, want[24:], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not attention_native.available(2, 8) and not os.environ.get("PDSERVE_CI"),
    reason=f"native kernel: {attention_native.unavailable_reason()}",
)
@pytest.mark.parametrize("window", [None, 20])
def test_softcap_native_kernel_equals_gather_path(window) -> None:
    """Decodes of 1 to 300 keys (several 128-key tiles), GQA group 2."""
    h, kvh, d, bs = 4, 2, 8, 4
    lens = [1, 7, 130, 300]
    gen = torch.Generator().manual_seed(7)
    nb = sum(-(-n // bs) for n in lens) + 2
    cache = torch.randn(2, nb, bs, kvh, d, generator=gen) * 2
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    q, k, v = (torch.randn(len(lens), n, d, generator=gen) * 2 for n in (h, kvh, kvh))
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens, strict=True)])
    width = max(len(t) for t in tables)
    kpos = torch.arange(width * bs)[None]
    ln = torch.tensor(lens)[:, None]
    wm = {} if window is None else {window: ((kpos < ln) & (kpos >= ln - window))[:, None, None, :]}
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    gather = AttentionMetadata(slots, len(lens), padded, (kpos < ln)[:, None, None, :], [], bs, wm)
    rows = decode_rows(tables, lens, [0] * len(lens), [window] if window else [], bs, nb, torch.device("cpu"))
    native = AttentionMetadata(slots, len(lens), None, None, [], bs, decode_rows=rows)
    for cap in (0.5, 3.0):
        ref = paged_attention(q, k, v, cache.clone(), gather, d**-0.5, window, cap)
        out = paged_attention(q, k, v, cache.clone(), native, d**-0.5, window, cap)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    uncapped = paged_attention(q, k, v, cache.clone(), native, d**-0.5, window)
    assert (uncapped - out).abs().max() > 1e-2  # the cap changed the output
    with pytest.raises(ValueError, match="softcap must be > 0"):
        attention_native.paged_attention_rows(
            q,
            cache[0],
            cache[1],
            rows.tables,
            rows.row,
            rows.lo[None],
            rows.hi,
            rows.first,
            1.0,
            softcap=-1.0,
        )


# ------------------------------------------------------------------ Phi-3 LongRoPE


def test_longrope_config_parsed(models) -> None:
    import math

    cfg = ModelConfig.from_path(models["phi3_longrope"])
    r = cfg.rope
    assert (r.kind, r.short_factor, r.long_factor, r.original_max_position_embeddings) == (
        "longrope",
        tuple(SHORT),
        tuple(LONG),
        OMAX,
    )
    assert r.factor == 2.0 and r.attention_factor == pytest.approx(
        math.sqrt(1 + math.log(2) / math.log(OMAX))
    )


def test_longrope_tables_equal_transformers(models, hf) -> None:
    """cos/sin of positions 0..255 (short factors, times the attention factor)."""
    from engine.models.rope import RotaryEmbedding

    cfg = ModelConfig.from_path(models["phi3_longrope"])
    ours = RotaryEmbedding(cfg.head_dim, OMAX, cfg.rope)
    rot = hf("phi3_longrope").model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rot(x, torch.arange(OMAX)[None])
    torch.testing.assert_close(ours.cos, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin, sin[0], rtol=0, atol=1e-6)


def test_longrope_golden_within_original_max_positions(models, hf) -> None:
    _golden(_engine(models["phi3_longrope"], max_model_len=OMAX), hf("phi3_longrope"))


def test_longrope_switch_is_refused(models) -> None:
    """max_model_len past original_max_position_embeddings (the default: 512) is refused, naming
    the switch and the largest length served exactly."""
    with pytest.raises(UnsupportedModelConfigError, match=rf"long_factor.*max_model_len <= {OMAX}"):
        _engine(models["phi3_longrope"])
    with pytest.raises(UnsupportedModelConfigError, match=rf"max_model_len <= {OMAX}"):
        _engine(models["phi3_longrope"], max_model_len=OMAX + 1)


def test_longrope_config_fields_checked() -> None:
    base = dict(
        model_type="phi3",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=512,
        original_max_position_embeddings=OMAX,
    )
    rp = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    assert ModelConfig.from_dict({**base, "rope_parameters": rp}).rope.kind == "longrope"
    legacy = {**rp, "type": "su", "original_max_position_embeddings": OMAX}
    del legacy["rope_type"]
    assert (
        ModelConfig.from_dict({**base, "rope_scaling": legacy}).rope.original_max_position_embeddings == OMAX
    )
    with pytest.raises(UnsupportedModelConfigError, match="short_factor.*expected 8 numbers"):
        ModelConfig.from_dict({**base, "rope_parameters": {**rp, "short_factor": [1.0] * 4}})
    with pytest.raises(UnsupportedModelConfigError, match="disagree"):
        ModelConfig.from_dict({**base, "rope_parameters": {**rp, "original_max_position_embeddings": 128}})
    with pytest.raises(UnsupportedModelConfigError, match="long_factor.*RoPE type 'longrope' requires it"):
        ModelConfig.from_dict(
            {**base, "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8}}
        )
    llama = {k: v for k, v in base.items() if k != "original_max_position_embeddings"}
    with pytest.raises(UnsupportedModelConfigError, match="longrope is implemented for phi3 only"):
        ModelConfig.from_dict({**llama, "model_type": "llama", "rope_parameters": rp})


# ------------------------------------------------------------------ the features matter


def _perturb(feature: str, model) -> None:
    with torch.no_grad():
        if feature == "gemma2_attn_cap":
            for lyr in model.model.layers:
                lyr.self_attn.attn_logit_softcapping = None
        elif feature == "gemma2_final_cap":
            model.config.final_logit_softcapping = None
        elif feature == "gemma2_window":
            for lyr in model.model.layers:
                lyr.self_attn.sliding_window = None
            model.config.layer_types = ["full_attention"] * len(model.model.layers)
        elif feature == "gemma2_scalar":
            for lyr in model.model.layers:
                lyr.self_attn.scaling = lyr.self_attn.head_dim**-0.5
        elif feature == "longrope_short_factor":
            rot = model.model.rotary_emb
            rot.original_inv_freq.mul_(torch.tensor(SHORT))
        else:  # longrope_attention_factor
            model.model.rotary_emb.attention_scaling = 1.0


@pytest.mark.parametrize(
    "feature",
    [
        "gemma2_attn_cap",
        "gemma2_final_cap",
        "gemma2_window",
        "gemma2_scalar",
        "longrope_short_factor",
        "longrope_attention_factor",
    ],
)
def test_the_tiny_configs_exercise_their_feature(models, feature) -> None:
    from transformers import AutoModelForCausalLM

    arch = "gemma2" if feature.startswith("gemma2") else "phi3_longrope"
    ids = torch.tensor(fam._prompts((60,), seed=9))
    a = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    _perturb(feature, b)
    with torch.no_grad():
        la, lb = torch.log_softmax(a(ids).logits[0], -1), torch.log_softmax(b(ids).logits[0], -1)
    assert (la - lb).abs().max() > 10 * fam.TOL


def test_gemma2_2b_config_json_parses() -> None:
    """google/gemma-2-2b's config.json (as published, hidden_act and hidden_activation both)."""
    d = {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304,
        "initializer_range": 0.02,
        "intermediate_size": 9216,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": 256000,
    }
    cfg = ModelConfig.from_dict(d)
    assert cfg.layer_windows == (4096, None) * 13
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.attn_scale) == (50.0, 30.0, 1 / 16)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 10000.0 and cfg.kv_window is None
    # absent caps take transformers' Gemma2 defaults (50 and 30), null switches them off
    absent = {k: v for k, v in d.items() if not k.endswith("softcapping")}
    assert ModelConfig.from_dict(absent) == cfg
    off = ModelConfig.from_dict({**d, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (off.attn_logit_softcapping, off.final_logit_softcapping) == (None, None)


def test_phi3_mini_128k_config_json_parses_and_is_served_up_to_4k() -> None:
    """microsoft/Phi-3-mini-128k-instruct's config.json layout (auto_map removed; the 48 factors
    replaced by synthetic ones): parsed, served with max_model_len <= 4096, refused past it."""
    d = {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "model_type": "phi3",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + i / 4 for i in range(48)],
            "short_factor": [1.0 + i / 40 for i in range(48)],
            "type": "longrope",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "vocab_size": 32064,
    }
    import math

    cfg = ModelConfig.from_dict(d)
    assert cfg.rope.kind == "longrope" and cfg.rope.factor == 32.0
    assert cfg.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    cfg.check_max_positions(4096)
    with pytest.raises(UnsupportedModelConfigError, match="max_model_len <= 4096"):
        cfg.check_max_positions(4097)
