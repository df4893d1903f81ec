"""config.json of Qwen3, Phi-3, Gemma 3, Mixtral, Qwen2-MoE and Qwen3-MoE (engine/models/config.py).

* What transformers 5.23 writes (``XConfig().to_dict()``) and configs shaped like the published
  checkpoints' (Qwen3-0.6B, Phi-3-mini-4k, Gemma-3-1b, Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B) load,
  every key classified, and we read the same sizes, expert counts, top-k, renormalisation and
  per-layer windows as transformers' own config object.
* A field that changes the math and is not implemented, or a bad value, is refused by name.
"""

from __future__ import annotations

import pytest

from engine.models.config import ModelConfig, UnsupportedModelConfigError, classify_keys
from pdserve.errors import ErrorCode, InvalidRequestError

ARCHS = ["qwen3", "phi3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]


def _hf_config(d: dict):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"})


def _default(arch: str) -> dict:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[arch]().to_dict()


def _small(arch: str, **over) -> dict:
    d = _default(arch)
    d.update(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    d.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if arch == "phi3":
        d.pop("head_dim")  # not a Phi3Config field
        d.update(pad_token_id=None, eos_token_id=2)
        # as older files write it: partial_rotary_factor, if any, at the top level
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    if arch in ("qwen2_moe", "qwen3_moe"):
        d.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)
        d.pop("num_local_experts", None)
    if arch == "mixtral":
        d.update(num_local_experts=4)
    d.pop("layer_types", None)  # written for the default's layer count
    d.update(over)
    return d


def _refused(d: dict, key: str, value) -> None:
    with pytest.raises(UnsupportedModelConfigError) as ei:
        ModelConfig.from_dict(d)
    e = ei.value
    assert (e.key, e.value) == (key, value)
    assert repr(key) in str(e) and repr(value) in str(e)
    assert isinstance(e, InvalidRequestError) and e.code is ErrorCode.INVALID_ARGUMENT


# shaped like the published config.json files (the keys and values that matter here)
HUB = {
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        head_dim=128,
        hidden_act="silu",
        hidden_size=1024,
        initializer_range=0.02,
        intermediate_size=3072,
        max_position_embeddings=40960,
        max_window_layers=28,
        model_type="qwen3",
        num_attention_heads=16,
        num_hidden_layers=28,
        num_key_value_heads=8,
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=None,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        transformers_version="4.51.0",
        use_cache=True,
        use_sliding_window=False,
        vocab_size=151936,
    ),  # fmt: skip
    "Phi-3-mini-4k": dict(
        architectures=["Phi3ForCausalLM"],
        attention_dropout=0.0,
        bos_token_id=1,
        embd_pdrop=0.0,
        eos_token_id=32000,
        hidden_act="silu",
        hidden_size=3072,
        initializer_range=0.02,
        intermediate_size=8192,
        max_position_embeddings=4096,
        model_type="phi3",
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=32,
        original_max_position_embeddings=4096,
        pad_token_id=32000,
        resid_pdrop=0.0,
        rms_norm_eps=1e-05,
        rope_scaling=None,
        rope_theta=10000.0,
        sliding_window=2047,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        transformers_version="4.40.2",
        use_cache=True,
        attention_bias=False,
        vocab_size=32064,
    ),  # fmt: skip
    "Gemma-3-1b": dict(
        architectures=["Gemma3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        attn_logit_softcapping=None,
        bos_token_id=2,
        cache_implementation="hybrid",
        eos_token_id=[1, 106],
        final_logit_softcapping=None,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=1152,
        initializer_range=0.02,
        intermediate_size=6912,
        max_position_embeddings=32768,
        model_type="gemma3_text",
        num_attention_heads=4,
        num_hidden_layers=26,
        num_key_value_heads=1,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_local_base_freq=10000,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=512,
        sliding_window_pattern=6,
        torch_dtype="bfloat16",
        transformers_version="4.50.0.dev0",
        use_cache=True,
        vocab_size=262144,
    ),  # fmt: skip
    "Mixtral-8x7B": dict(
        architectures=["MixtralForCausalLM"],
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        hidden_size=4096,
        initializer_range=0.02,
        intermediate_size=14336,
        max_position_embeddings=32768,
        model_type="mixtral",
        num_attention_heads=32,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_key_value_heads=8,
        num_local_experts=8,
        output_router_logits=False,
        rms_norm_eps=1e-05,
        rope_theta=1000000.0,
        router_aux_loss_coef=0.02,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        transformers_version="4.36.0.dev0",
        use_cache=True,
        vocab_size=32000,
    ),  # fmt: skip
    "Qwen1.5-MoE-A2.7B": dict(
        architectures=["Qwen2MoeForCausalLM"],
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151643,
        hidden_act="silu",
        hidden_size=2048,
        initializer_range=0.02,
        intermediate_size=5632,
        max_position_embeddings=8192,
        max_window_layers=21,
        model_type="qwen2_moe",
        num_attention_heads=16,
        num_hidden_layers=24,
        num_key_value_heads=16,
        rms_norm_eps=1e-06,
        rope_theta=1000000.0,
        sliding_window=32768,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        transformers_version="4.39.0.dev0",
        use_cache=True,
        use_sliding_window=False,
        vocab_size=151936,
        decoder_sparse_step=1,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    ),  # fmt: skip
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        decoder_sparse_step=1,
        eos_token_id=151645,
        head_dim=128,
        hidden_act="silu",
        hidden_size=2048,
        initializer_range=0.02,
        intermediate_size=6144,
        max_position_embeddings=40960,
        max_window_layers=48,
        mlp_only_layers=[],
        model_type="qwen3_moe",
        moe_intermediate_size=768,
        norm_topk_prob=True,
        num_attention_heads=32,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_key_value_heads=4,
        output_router_logits=False,
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=1000000.0,
        router_aux_loss_coef=0.001,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        transformers_version="4.51.0",
        use_cache=True,
        use_sliding_window=False,
        vocab_size=151936,
    ),  # fmt: skip
}


def _hf_windows(hf) -> tuple:
    """Per-layer window as transformers' modeling code applies it."""
    n = hf.num_hidden_layers
    if hf.model_type in ("qwen3", "qwen2_moe", "gemma3_text"):
        return tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    return (hf.sliding_window,) * n  # phi3, mixtral, qwen3_moe: every layer (None = full)


def _agrees_with_hf(d: dict) -> ModelConfig:
    cfg = ModelConfig.from_dict(d)
    hf = _hf_config(d)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rms_norm_eps) == (
        head_dim,
        hf.num_key_value_heads,
        hf.rms_norm_eps,
    )
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.layer_windows == _hf_windows(hf)
    assert cfg.qk_norm == (d["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"))
    if d["model_type"] == "gemma3_text":
        rp = hf.rope_parameters
        assert cfg.rope_local is not None
        assert (cfg.rope.theta, cfg.rope.kind) == (
            rp["full_attention"]["rope_theta"],
            rp["full_attention"]["rope_type"],
        )
        assert cfg.rope.factor == rp["full_attention"].get("factor", 1.0)
        assert (cfg.rope_local.theta, cfg.rope_local.kind) == (
            rp["sliding_attention"]["rope_theta"],
            "default",
        )
        assert cfg.attn_scale == hf.query_pre_attn_scalar**-0.5
        assert cfg.final_logit_softcapping == hf.final_logit_softcapping
        assert (cfg.hidden_act, cfg.tie_word_embeddings) == (hf.hidden_activation, hf.tie_word_embeddings)
    if cfg.moe is None:
        assert d["model_type"] in ("qwen3", "phi3", "gemma3_text")
        return cfg
    m = cfg.moe
    assert (m.num_experts, m.top_k) == (hf.num_experts, hf.num_experts_per_tok)
    assert m.norm_topk_prob == (True if d["model_type"] == "mixtral" else hf.norm_topk_prob)
    sparse = tuple(
        i not in getattr(hf, "mlp_only_layers", []) and (i + 1) % getattr(hf, "decoder_sparse_step", 1) == 0
        for i in range(hf.num_hidden_layers)
    )
    assert m.sparse_layers == sparse
    if d["model_type"] == "qwen2_moe":
        assert m.shared_expert_intermediate_size == hf.shared_expert_intermediate_size
        assert cfg.qkv_bias == hf.qkv_bias
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_default_configs_load_like_transformers(arch) -> None:
    d = _default(arch)
    assert set(classify_keys(d)) == set(d)
    _agrees_with_hf(d)


@pytest.mark.parametrize("name", sorted(HUB))
def test_published_configs_load_like_transformers(name) -> None:
    d = HUB[name]
    assert set(classify_keys(d)) == set(d)
    cfg = _agrees_with_hf(d)
    if name == "Qwen3-0.6B":
        assert (cfg.head_dim, cfg.qkv_bias, cfg.o_proj_bias, cfg.tie_word_embeddings) == (
            128,
            False,
            False,
            True,
        )
    if name == "Phi-3-mini-4k":
        assert cfg.layer_windows == (2047,) * 32 and cfg.rope.partial_rotary_factor == 1.0


def test_qwen3_head_dim_defaults_to_128_and_attention_bias_is_read() -> None:
    d = _small("qwen3", attention_bias=True)
    d.pop("head_dim")
    cfg = _agrees_with_hf(d)
    assert cfg.head_dim == 128 and (cfg.qkv_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, True, False)


def test_phi3_partial_rotary_from_rope_parameters_or_top_level() -> None:
    rp = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_dict(_small("phi3", rope_parameters=rp)).rope.rotary_dim(16) == 8
    top = _small(
        "phi3", partial_rotary_factor=0.75, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    assert ModelConfig.from_dict(top).rope.rotary_dim(16) == 12
    # rope_parameters wins over the top-level key (Phi3Config: setdefault)
    both = _small("phi3", partial_rotary_factor=0.75, rope_parameters=rp)
    assert ModelConfig.from_dict(both).rope.partial_rotary_factor == 0.5


@pytest.mark.parametrize(("step", "only"), [(1, []), (2, []), (1, [0, 3]), (2, [1])])
def test_dense_layers_follow_decoder_sparse_step_and_mlp_only_layers(step, only) -> None:
    for arch in ("qwen2_moe", "qwen3_moe"):
        _agrees_with_hf(_small(arch, decoder_sparse_step=step, mlp_only_layers=only))


@pytest.mark.parametrize(
    ("use", "window", "mwl"), [(False, 4096, 2), (True, 32, 0), (True, 32, 3), (True, 32, 4)]
)
def test_windows_follow_transformers(use, window, mwl) -> None:
    for arch in ("qwen3", "qwen2_moe"):
        kw = dict(use_sliding_window=use, sliding_window=window, max_window_layers=mwl)
        _agrees_with_hf(_small(arch, **kw))  # the rule from max_window_layers
        _agrees_with_hf(_hf_config(_small(arch, **kw)).to_dict())  # from the layer_types written
    _agrees_with_hf(_small("qwen3_moe", use_sliding_window=use, sliding_window=window))
    _agrees_with_hf(_small("mixtral", sliding_window=window if use else None))
    _agrees_with_hf(_small("phi3", sliding_window=window if use else None))


def test_gemma3_rope_and_windows_follow_transformers() -> None:
    legacy = _small("gemma3_text", rope_theta=5e5, rope_local_base_freq=2e4, sliding_window=32)
    legacy.pop("rope_parameters")
    legacy["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}  # the global layers only
    legacy["sliding_window_pattern"] = 2
    cfg = _agrees_with_hf(legacy)
    assert cfg.layer_windows == (32, None, 32, None)
    assert (cfg.rope.theta, cfg.rope.factor, cfg.rope_local.theta, cfg.rope_local.kind) == (
        5e5,
        4.0,
        2e4,
        "default",
    )
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert _agrees_with_hf(_small("gemma3_text", layer_types=types, sliding_window=8)).layer_windows == (
        None,
        8,
        8,
        None,
    )
    cfg = _agrees_with_hf(_small("gemma3_text", final_logit_softcapping=30.0, query_pre_attn_scalar=144))
    assert cfg.final_logit_softcapping == 30.0 and cfg.attn_scale == 144**-0.5


def test_gemma3_multimodal_and_gemma1_are_not_supported() -> None:
    for mt in ("gemma3", "gemma"):
        with pytest.raises(InvalidRequestError, match=f"model_type '{mt}' is not supported"):
            ModelConfig.from_dict({**_small("gemma3_text"), "model_type": mt})


LONGROPE = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}


@pytest.mark.parametrize(
    ("arch", "key", "value"),
    [
        ("qwen3", "mlp_bias", True),
        ("qwen3", "some_new_knob", 1),
        ("qwen3", "partial_rotary_factor", 0.5),  # Qwen3's RoPE rotates the whole head
        ("phi3", "attention_bias", True),
        ("phi3", "partial_rotary_factor", 1.5),
        ("phi3", "partial_rotary_factor", 0.1875),  # rotates 3 of 16 dims: odd
        ("phi3", "auto_map", {"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}),
        ("mixtral", "num_experts", 3),  # disagrees with num_local_experts (4)
        ("mixtral", "num_experts_per_tok", 5),  # more than the experts
        ("mixtral", "mlp_bias", True),
        ("qwen2_moe", "norm_topk_prob", "yes"),
        ("qwen2_moe", "qkv_bias", "true"),
        ("qwen2_moe", "shared_expert_intermediate_size", 0),
        ("qwen2_moe", "mlp_only_layers", "1"),
        ("qwen2_moe", "decoder_sparse_step", 0),
        ("qwen3_moe", "layer_types", ["full_attention"] * 4),  # not a Qwen3MoeConfig field
        ("qwen3_moe", "num_experts_per_tok", 0),
        ("qwen3_moe", "shared_expert_intermediate_size", 64),  # no shared expert in Qwen3-MoE
        ("qwen3_moe", "use_sliding_window", 1),
        ("gemma3_text", "attn_logit_softcapping", 0),  # a cap must be positive (or null)
        ("gemma2", "attn_logit_softcapping", -1.0),
        ("gemma2", "sliding_window_pattern", 2),  # not a Gemma2Config field
        ("gemma2", "use_bidirectional_attention", True),
        ("gemma2", "hidden_act", "silu"),  # disagrees with hidden_activation
        ("gemma2", "sliding_window", None),  # sliding layers need a window
        ("gemma3_text", "use_bidirectional_attention", True),
        ("gemma3_text", "hidden_act", "silu"),  # disagrees with hidden_activation
        ("gemma3_text", "hidden_activation", "relu2"),
        ("gemma3_text", "final_logit_softcapping", 0),
        ("gemma3_text", "query_pre_attn_scalar", -1),
        ("gemma3_text", "sliding_window", None),  # sliding layers need a window
        ("gemma3_text", "rope_parameters", {"chunked_attention": {"rope_type": "default"}}),
        ("gemma3_text", "mlp_bias", True),
    ],
)
def test_unsupported_fields_and_values_are_refused_by_name(arch, key, value) -> None:
    _refused(_small(arch, **{key: value}), key, value)


@pytest.mark.parametrize("kind", ["longrope", "su", "yarn"])
def test_phi3_longrope_fields_are_checked_by_name(kind) -> None:
    """Phi-3-mini-128k's longrope scaling (and the legacy su/yarn names, which read
    original_max_position_embeddings from the RoPE parameters only) is parsed; a missing factor
    list is refused by name (the switch to long_factor: tests/unit/test_models_gemma2_longrope.py)."""
    legacy = kind != "longrope"
    d = _small("phi3", rope_scaling={**LONGROPE, "type": kind}, original_max_position_embeddings=256)
    if legacy:
        _refused(d, "rope_scaling.original_max_position_embeddings", None)
        d["rope_scaling"]["original_max_position_embeddings"] = 256
    r = ModelConfig.from_dict(d).rope
    assert (r.kind, r.original_max_position_embeddings, r.long_factor) == ("longrope", 256, (2.0,) * 8)
    _refused(
        _small("phi3", rope_parameters={"rope_type": kind, "rope_theta": 1e4, "short_factor": [1.0] * 8}),
        "rope_parameters.long_factor",
        None,
    )


def test_training_only_router_fields_are_inert() -> None:
    base = ModelConfig.from_dict(_small("mixtral"))
    d = _small("mixtral", router_jitter_noise=0.5, router_aux_loss_coef=0.3, output_router_logits=True)
    assert ModelConfig.from_dict(d) == base
    phi = _small("phi3", resid_pdrop=0.2, embd_pdrop=0.1, original_max_position_embeddings=1024)
    assert ModelConfig.from_dict(phi) == ModelConfig.from_dict(_small("phi3"))
    # still refused on the families whose HF model has no such field
    from transformers import LlamaConfig

    llama = {**LlamaConfig(num_hidden_layers=2).to_dict(), "router_jitter_noise": 0.5}
    _refused(llama, "router_jitter_noise", 0.5)


def test_tensor_parallel_of_moe_models_needs_divisible_expert_sizes() -> None:
    """MoE models shard every expert's intermediate columns (tests/unit/test_tensor_parallel_moe.py);
    an expert or shared-expert size that does not divide is refused by name."""
    from engine.models.tp_shard import check_divisible

    for arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        check_divisible(ModelConfig.from_dict(_small(arch)), 2)
    with pytest.raises(ValueError, match=r"\{'moe_intermediate_size': 33\}"):
        check_divisible(ModelConfig.from_dict(_small("qwen3_moe", moe_intermediate_size=33)), 2)
    with pytest.raises(ValueError, match=r"\{'shared_expert_intermediate_size': 81\}"):
        check_divisible(ModelConfig.from_dict(_small("qwen2_moe", shared_expert_intermediate_size=81)), 2)
    # Qwen3-MoE with every layer sparse: the unused dense intermediate_size need not divide
    check_divisible(ModelConfig.from_dict(_small("qwen3_moe", intermediate_size=127)), 2)
    with pytest.raises(ValueError, match=r"\{'intermediate_size': 127\}"):  # Qwen2-MoE layer 1 dense
        check_divisible(
            ModelConfig.from_dict(_small("qwen2_moe", intermediate_size=127, mlp_only_layers=[1])), 2
        )
    check_divisible(ModelConfig.from_dict(_small("qwen3")), 2)
    check_divisible(ModelConfig.from_dict(_small("phi3")), 2)
