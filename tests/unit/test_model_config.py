"""config.json parsing (engine/models/config.py): every key is classified per architecture,
whatever could change the math is implemented or refused with an error naming the field.

* What transformers 5.23 itself writes (``XConfig().to_dict()``, the tiny models, the real
  SmolLM2 config) loads; every key of those is classified.
* An unknown key, an unsupported value (activation, RoPE type, bias on an architecture without
  one, quantization...) is refused, the message naming the field and the value.
* Qwen2's per-layer windows follow transformers' own rule (``Qwen2Config.layer_types``).
* The activations equal HF's ``ACT2FN`` bit for bit; TP sharding keeps every bias right.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.models.config import (
    SUPPORTED_ACTIVATIONS,
    KeyRole,
    ModelConfig,
    UnsupportedModelConfigError,
    classify_keys,
)
from pdserve.errors import ErrorCode, InvalidRequestError


def _hf_dicts() -> dict[str, dict]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig().to_dict(),
        "mistral": MistralConfig().to_dict(),
        "qwen2": Qwen2Config().to_dict(),
    }


def _small(arch: str, **over) -> dict:
    d = _hf_dicts()[arch]
    d.update(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    d.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    d.pop("layer_types", None)  # written for the default's 32 layers
    d.update(over)
    return d


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_default_configs_load_and_every_key_is_classified(arch) -> None:
    d = _hf_dicts()[arch]
    roles = classify_keys(d)
    assert set(roles) == set(d)
    cfg = ModelConfig.from_dict(d)
    assert cfg.model_type == arch and cfg.hidden_act == "silu"
    # HF defaults: Mistral windowed everywhere (4096), Qwen2 windows off unless use_sliding_window
    assert cfg.layer_windows == ((4096,) * 32 if arch == "mistral" else (None,) * 32)


def test_tiny_models_and_the_real_model_load(tiny_models, smollm_path) -> None:
    for path in [*tiny_models.values(), smollm_path]:
        d = json.loads((path / "config.json").read_text())
        assert set(classify_keys(d)) == set(d)
        ModelConfig.from_path(path)
    smol = json.loads((smollm_path / "config.json").read_text())
    roles = classify_keys(smol)
    assert roles["unk_token_id"] is KeyRole.INERT and roles["_model_name_or_path"] is KeyRole.INERT
    assert roles["hidden_act"] is KeyRole.USED and roles["attention_dropout"] is KeyRole.INERT


def _refused(d: dict, key: str, value) -> UnsupportedModelConfigError:
    with pytest.raises(UnsupportedModelConfigError) as ei:
        ModelConfig.from_dict(d)
    e = ei.value
    assert e.key == key and e.value == value
    assert repr(key) in str(e) and repr(value) in str(e)
    assert isinstance(e, InvalidRequestError) and e.code is ErrorCode.INVALID_ARGUMENT
    return e


@pytest.mark.parametrize(
    ("arch", "key", "value"),
    [
        ("llama", "hidden_act", "relu2"),
        ("mistral", "hidden_act", "quick_gelu"),
        ("llama", "some_new_knob", 3),  # unknown field
        ("qwen2", "use_mrope", True),  # unknown for qwen2 (a Qwen2-VL field)
        ("llama", "quantization_config", {"quant_method": "gptq", "bits": 4}),
        ("llama", "sliding_window", 4096),  # HF Llama has no window: refuse, do not ignore
        ("mistral", "mlp_bias", True),  # HF Mistral has no MLP bias
        ("mistral", "attention_bias", True),
        ("qwen2", "mlp_bias", True),
        ("qwen2", "attention_bias", True),  # HF Qwen2 has q/k/v bias always and no o_proj bias
        ("llama", "partial_rotary_factor", 0.5),
        ("llama", "auto_map", {"AutoModelForCausalLM": "modeling_x.X"}),
        ("llama", "is_encoder_decoder", True),
        ("llama", "pruned_heads", {"0": [1]}),
        ("llama", "architectures", ["LlamaForSequenceClassification"]),
    ],
)
def test_unknown_fields_and_unsupported_values_are_refused_by_name(arch, key, value) -> None:
    _refused(_small(arch, **{key: value}), key, value)


@pytest.mark.parametrize(
    ("rope", "key", "value"),
    [
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_parameters.rope_type", "yarn"),
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type", "dynamic"),
        ({"rope_type": "linear"}, "rope_parameters.factor", None),  # required
        ({"rope_type": "default", "mrope_section": [1, 2]}, "rope_parameters.mrope_section", [1, 2]),
    ],
)
def test_unsupported_rope_is_refused_by_name(rope, key, value) -> None:
    _refused(_small("llama", rope_parameters=rope), key, value)


def test_legacy_rope_scaling_takes_precedence_like_hf() -> None:
    d = _small("llama", rope_theta=5e5)
    d.pop("rope_parameters")
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    cfg = ModelConfig.from_dict(d)
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.theta) == ("linear", 2.0, 5e5)
    _refused(
        _small("llama", rope_scaling={"type": "longrope", "factor": 2.0}),
        "rope_scaling.rope_type",
        "longrope",
    )


def test_inert_fields_load_with_any_value() -> None:
    d = _small(
        "llama",
        attention_dropout=0.1,  # dropout: training only
        pretraining_tp=2,  # HF 5.x ignores it (older: the same matmul in slices)
        initializer_range=0.5,
        temperature=0.3,  # generation defaults: the request decides sampling
        use_cache=False,
        _commit_hash="abc",
    )
    cfg = ModelConfig.from_dict(d)
    assert cfg == ModelConfig.from_dict(_small("llama"))


def test_llama_biases_and_activation_are_read() -> None:
    cfg = ModelConfig.from_dict(_small("llama", attention_bias=True, mlp_bias=True, hidden_act="gelu"))
    assert (cfg.qkv_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.hidden_act) == (True, True, True, "gelu")
    q = ModelConfig.from_dict(_small("qwen2"))
    assert (q.qkv_bias, q.o_proj_bias, q.mlp_bias) == (True, False, False)
    m = ModelConfig.from_dict(_small("mistral", attention_bias=False, mlp_bias=False))  # defaults: accepted
    assert (m.qkv_bias, m.o_proj_bias, m.mlp_bias) == (False, False, False)


@pytest.mark.parametrize(
    ("use", "window", "mwl"),
    [(False, 4096, 2), (True, 32, 0), (True, 32, 1), (True, 32, 3), (True, 32, 4), (True, None, 1)],
)
def test_qwen2_layer_windows_follow_transformers(use, window, mwl) -> None:
    from transformers import Qwen2Config

    kw = dict(use_sliding_window=use, sliding_window=window, max_window_layers=mwl)
    hf = Qwen2Config(**{**_small("qwen2"), **kw})
    want = tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    raw = _small("qwen2", **kw)  # no layer_types: the rule from max_window_layers (older files)
    assert ModelConfig.from_dict(raw).layer_windows == want
    # and from the layer_types transformers writes
    assert ModelConfig.from_dict(hf.to_dict()).layer_windows == want


def test_qwen2_explicit_layer_types_win_and_bad_ones_are_refused() -> None:
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = ModelConfig.from_dict(
        _small("qwen2", use_sliding_window=True, sliding_window=16, layer_types=types)
    )
    assert cfg.layer_windows == (16, None, 16, None) and cfg.kv_window is None
    _refused(_small("qwen2", use_sliding_window=False, layer_types=types), "layer_types", types)
    bad = ["chunked_attention"] * 4
    _refused(_small("qwen2", use_sliding_window=True, sliding_window=16, layer_types=bad), "layer_types", bad)
    _refused(_small("qwen2", layer_types=types[:2]), "layer_types", types[:2])


def test_mistral_window_and_layer_types() -> None:
    assert ModelConfig.from_dict(_small("mistral", sliding_window=None)).layer_windows == (None,) * 4
    cfg = ModelConfig.from_dict(_small("mistral", sliding_window=64))
    assert cfg.layer_windows == (64,) * 4 and cfg.kv_window == 64
    same = ["sliding_attention"] * 4
    assert ModelConfig.from_dict(_small("mistral", sliding_window=64, layer_types=same)).kv_window == 64
    mixed = ["full_attention", "sliding_attention"] * 2  # HF Mistral would ignore this: refuse
    _refused(_small("mistral", sliding_window=64, layer_types=mixed), "layer_types", mixed)
    _refused(_small("mistral", sliding_window=0), "sliding_window", 0)


def test_unsupported_model_type_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="model_type 'gemma'"):
        ModelConfig.from_dict(_small("llama", model_type="gemma"))


@pytest.mark.parametrize("name", SUPPORTED_ACTIVATIONS)
def test_activations_equal_hf_act2fn(name) -> None:
    from transformers.activations import ACT2FN

    from engine.models.llama import activation

    x = torch.randn(4096) * 4
    assert torch.equal(activation(name)(x), ACT2FN[name](x))


def test_tp_shards_add_up_with_every_bias(tiny_models) -> None:
    """Column-parallel biases split, row-parallel ones (o_proj, down_proj) counted once."""
    from engine.attention import AttentionMetadata, PrefillSlice
    from engine.models.loader import load_model
    from engine.models.tp_shard import shard_model

    whole = load_model(tiny_models["llama_gelu_bias"], torch.float32, torch.device("cpu"))
    cfg = whole.config
    assert cfg.o_proj_bias and cfg.mlp_bias
    layer = whole.model.layers[0]
    assert layer.self_attn.o_proj.bias.abs().sum() > 0 and layer.mlp.down_proj.bias.abs().sum() > 0
    tp, t = 2, 7
    shards = [shard_model(copy.deepcopy(whole), r, tp, lambda x: None) for r in range(tp)]
    for s in shards:
        for lyr in s.model.layers:
            lyr.self_attn.all_reduce = lyr.mlp.all_reduce = None
    x = torch.randn(t, cfg.hidden_size)
    cos, sin = whole.rotary(torch.arange(t), x.dtype)
    md = AttentionMetadata(torch.arange(t), 0, None, None, [PrefillSlice(0, t, 0, None)], 16)
    for li in range(cfg.num_hidden_layers):
        want_attn = whole.model.layers[li].self_attn(x, cos, sin, torch.zeros(2, 4, 16, 2, cfg.head_dim), md)
        want_mlp = whole.model.layers[li].mlp(x)
        attn = sum(
            s.model.layers[li].self_attn(x, cos, sin, torch.zeros(2, 4, 16, 1, cfg.head_dim), md)
            for s in shards
        )
        mlp = sum(s.model.layers[li].mlp(x) for s in shards)
        torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp, want_mlp, rtol=1e-5, atol=1e-5)
