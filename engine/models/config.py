"""Model configuration parsed from an HF ``config.json``: the Llama family (llama, mistral, qwen2),
Qwen3 (qwen3), Phi-3 (phi3), Gemma 2 (gemma2), Gemma 3 (gemma3_text) and the mixtures of experts (mixtral,
qwen2_moe, qwen3_moe).

The rule: **every key of config.json is classified** for its architecture, and a key that could
change the computation is either implemented or refused. :func:`classify_keys` sorts each key
into one :class:`KeyRole`:

* ``USED``: implemented and read here (sizes, norms, RoPE, activation, biases, sliding window...);
  an unsupported *value* of such a key (``hidden_act="relu2"``, ``rope_type="yarn"``) is refused.
* ``INERT``: cannot change the forward pass at inference: metadata (``architectures``,
  ``transformers_version``, ``_name_or_path`` and any other ``_``-prefixed bookkeeping key),
  token ids other than EOS, training-only settings (``initializer_range``, ``attention_dropout``:
  HF applies dropout only in training), HF runtime switches (``use_cache``, ``return_dict``...),
  generation defaults (``temperature``, ``top_p``...: pdserve takes sampling from the request,
  never from config.json), and ``pretraining_tp`` (HF 5.x ignores it; older versions only split
  the same matmuls into slices, the same math).
* ``DEFAULT_ONLY``: accepted only with the value that leaves the math unchanged (for example
  ``quantization_config``: absent/null; ``mlp_bias``: false on Mistral/Qwen2, whose HF modules
  have no MLP bias; ``is_encoder_decoder``: false).

Any other key is unknown and refused: :class:`UnsupportedModelConfigError` names the key and its
value. Supported values: ``hidden_act`` in :data:`SUPPORTED_ACTIVATIONS`; RoPE ``default``,
``linear``, ``llama3`` (and ``longrope`` on Phi-3); Llama ``attention_bias`` (q/k/v **and** o_proj, as HF) and ``mlp_bias``
(gate/up/down); Qwen2 has q/k/v bias always and no o_proj bias; sliding windows per layer.

Sliding windows (HF semantics, ``transformers.masking_utils.sliding_window_overlay``): a query at
position ``i`` of a windowed layer attends to keys ``j`` with ``j <= i`` and ``i - j < window``.
Mistral: every layer uses ``sliding_window`` (null = full attention). Qwen2: the window is
``sliding_window`` only when ``use_sliding_window`` is true; layer ``i`` is windowed when
``layer_types[i] == "sliding_attention"``, and without ``layer_types`` when ``i >=
max_window_layers`` (transformers 5.23 ``Qwen2Config.__post_init__``); Qwen3 follows the same
rule. Mixtral, Phi-3 and Qwen3-MoE window every layer with ``sliding_window`` (Qwen3-MoE only
when ``use_sliding_window`` is true); Qwen2-MoE windows the layers ``layer_types`` names, else
the even-numbered layers ``i < max_window_layers`` (its own ``__post_init__``); Gemma 2 and 3 window
its local layers.

Newer families (see ``_USED_BY_ARCH``; each is golden-tested like the Llama family):

* ``qwen3``: per-head RMSNorm of q and k (``ModelConfig.qk_norm``), ``head_dim`` defaults to 128
  (not ``hidden/heads``), ``attention_bias`` gives q/k/v **and** o_proj a bias.
* ``phi3``: fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors (the model's own fused
  layout), partial rotary (``partial_rotary_factor``, in ``rope_parameters`` or at the top level,
  as ``Phi3Config`` reads it); RoPE ``longrope`` (and the legacy ``su``/``yarn`` names,
  :func:`_longrope`): ``short_factor`` and the attention factor, served only up to
  ``original_max_position_embeddings`` tokens (:meth:`ModelConfig.check_max_positions` refuses a
  longer ``max_model_len``: transformers' switch to ``long_factor`` cannot be exact over a paged
  cache); resid/embd dropout are inert.
* ``gemma2`` and ``gemma3_text`` (Gemma 3 text-only ``Gemma3ForCausalLM``): ``hidden_activation``
  (not ``hidden_act``), ``query_pre_attn_scalar`` (the softmax scale), ``final_logit_softcapping``
  and ``attn_logit_softcapping`` (absent: the family's HF default, Gemma 2 30 / 50, Gemma 3 none),
  local/global layers (``layer_types``, else every ``sliding_window_pattern``-th layer global on
  Gemma 3, every second on Gemma 2); Gemma 3: RoPE per layer type (nested ``rope_parameters``, or
  ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` on the global layers); Gemma 2: one
  RoPE. ``use_bidirectional_attention`` is refused. The models are engine.models.gemma2/gemma3.
* ``mixtral``, ``qwen2_moe``, ``qwen3_moe``: :class:`MoEConfig` (top-k of the softmax over the
  experts, renormalised when ``norm_topk_prob``, always on Mixtral; Qwen2-MoE's shared expert
  with its sigmoid gate and ``qkv_bias``; dense layers from ``mlp_only_layers`` /
  ``decoder_sparse_step``); the router's training-only fields are inert.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidRequestError, ModelNotFoundError

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
)
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

# HF ACT2FN names implemented by engine.models.llama.activation (bit-identical to HF's modules)
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_LAYER_TYPE_ALIASES = {"attention": FULL_ATTENTION}  # transformers' legacy remap


class UnsupportedModelConfigError(InvalidRequestError):
    """config.json has a key (or a value of a key) this engine does not implement.

    ``key`` names the field (dotted for nested keys, e.g. ``rope_parameters.rope_type``);
    ``value`` is the offending value.
    """

    def __init__(self, model_type: str, key: str, value: Any, why: str) -> None:
        super().__init__(f"{model_type} config field {key!r} = {value!r} is not supported: {why}")
        self.key = key
        self.value = value


class KeyRole(enum.Enum):
    USED = "used"  # implemented: read and applied
    INERT = "inert"  # cannot change the computation at inference
    DEFAULT_ONLY = "default_only"  # accepted only with its math-neutral value


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (Phi-3); 1.0 elsewhere
    # longrope (Phi-3): per-frequency divisors of sequences up to original_max_position_embeddings
    # tokens (short) and past it (long), and the factor cos/sin are multiplied by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        """How many leading dims of each head RoPE rotates (HF: ``int(head_dim * factor)``)."""
        return int(head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP (HF ``*SparseMoeBlock``), for every layer whose
    ``sparse_layers`` entry is true (the others have the dense MLP of ``intermediate_size``).

    Routing (HF ``*TopKRouter``): ``softmax`` over ``num_experts`` router logits in float32, the
    ``top_k`` largest, divided by their sum when ``norm_topk_prob``; ``fp32_weights``: the
    weights stay float32 when scaling the expert outputs (Mixtral) instead of being cast to the
    model dtype (Qwen). ``shared_expert_intermediate_size`` > 0: a dense shared expert added to
    every token, scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]
    shared_expert_intermediate_size: int = 0
    fp32_weights: bool = False


# ------------------------------------------------------------------ key tables

# keys every architecture reads
_USED_COMMON = frozenset(
    {
        "model_type",
        "architectures",  # checked: a *ForCausalLM head
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "tie_word_embeddings",
        "eos_token_id",
        "bos_token_id",
        "torch_dtype",
        "dtype",
    }
)
_USED_BY_ARCH: dict[str, frozenset[str]] = {
    "llama": _USED_COMMON | {"attention_bias", "mlp_bias"},
    # layer_types on Mistral: HF ignores it; read only to refuse one that disagrees with sliding_window
    "mistral": _USED_COMMON | {"sliding_window", "layer_types"},
    "qwen2": _USED_COMMON | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "qwen3": _USED_COMMON
    | {"attention_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "phi3": _USED_COMMON | {"sliding_window", "partial_rotary_factor", "original_max_position_embeddings"},
    "mixtral": _USED_COMMON | {"sliding_window", "num_local_experts", "num_experts", "num_experts_per_tok"},
    "qwen2_moe": _USED_COMMON
    | {
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "qkv_bias",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    },
    "gemma2": _USED_COMMON
    | {
        "hidden_activation",
        "attention_bias",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    },
    "gemma3_text": _USED_COMMON
    | {
        "hidden_activation",
        "attention_bias",
        "query_pre_attn_scalar",
        "sliding_window",
        "sliding_window_pattern",
        "layer_types",
        "rope_local_base_freq",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    },
    "qwen3_moe": _USED_COMMON
    | {
        "attention_bias",
        "sliding_window",
        "use_sliding_window",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    },
}
_MOE_TRAINING_KEYS = frozenset({"router_aux_loss_coef", "output_router_logits", "router_jitter_noise"})
# inert for one architecture only (training-only settings, or keys its HF model never reads)
_INERT_BY_ARCH: dict[str, frozenset[str]] = {
    "llama": frozenset(),
    "mistral": frozenset(),
    "qwen2": frozenset(),
    "qwen3": frozenset(),
    "phi3": frozenset({"resid_pdrop", "embd_pdrop"}),  # dropout (training only)
    "gemma2": frozenset({"cache_implementation"}),  # transformers' choice of KV cache class
    "gemma3_text": frozenset({"cache_implementation"}),
    # the router's load-balancing loss and its jitter noise apply only in training
    "mixtral": _MOE_TRAINING_KEYS,
    "qwen2_moe": _MOE_TRAINING_KEYS,
    # Qwen3MoeConfig has no max_window_layers (real checkpoints carry it; transformers ignores it)
    "qwen3_moe": _MOE_TRAINING_KEYS | {"max_window_layers"},
}

# generation defaults (transformers GenerationConfig._get_default_generation_params): HF pops them
# from the model config; pdserve takes sampling from each request
_GENERATION_KEYS = frozenset(
    {
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "bad_words_ids",
        "begin_suppress_tokens",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "encoder_repetition_penalty",
        "epsilon_cutoff",
        "eta_cutoff",
        "exponential_decay_length_penalty",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_scores",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict_in_generate",
        "suppress_tokens",
        "target_lookbehind",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "use_cache",
    }
)
INERT_KEYS = _GENERATION_KEYS | frozenset(
    {
        "transformers_version",
        "name_or_path",
        "initializer_range",
        "attention_dropout",
        "pretraining_tp",
        "pad_token_id",
        "unk_token_id",
        "sep_token_id",
        "cls_token_id",
        "mask_token_id",
        "decoder_start_token_id",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "chunk_size_feed_forward",  # HF chunks the FFN over the sequence: the same math
        "attn_implementation",
        "is_decoder",
    }
)


def _bool(mt: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise UnsupportedModelConfigError(mt, key, v, "expected true or false")
    return v


def _is_false(v: Any) -> bool:
    return v is False or v is None or v == 0


def _is_empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _is_one(v: Any) -> bool:
    return v is None or v == 1 or v == 1.0


# key -> (accepts value?, what the accepted value is) for every architecture
_DEFAULT_ONLY_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "quantization_config": (_is_empty, "quantized checkpoints are not supported (absent or null only)"),
    "is_encoder_decoder": (_is_false, "only decoder-only models are supported (false only)"),
    "add_cross_attention": (_is_false, "cross-attention is not supported (false only)"),
    "tie_encoder_decoder": (_is_false, "only decoder-only models are supported (false only)"),
    "cross_attention_hidden_size": (_is_empty, "cross-attention is not supported (null only)"),
    "pruned_heads": (_is_empty, "pruned attention heads are not supported (empty only)"),
    "partial_rotary_factor": (_is_one, "partial rotary embeddings are not supported (1.0 only)"),
    "auto_map": (
        _is_empty,
        "custom modeling code is not run (remove auto_map to use the built-in architecture)",
    ),
}
_DEFAULT_ONLY_BY_ARCH: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "llama": {
        "sliding_window": (_is_empty, "HF Llama has no sliding window (null only; use model_type mistral)"),
    },
    "mistral": {
        "attention_bias": (_is_false, "HF Mistral has no attention bias (false only)"),
        "mlp_bias": (_is_false, "HF Mistral has no MLP bias (false only)"),
    },
    "qwen2": {
        "mlp_bias": (_is_false, "HF Qwen2 has no MLP bias (false only)"),
    },
    "qwen3": {
        "mlp_bias": (_is_false, "HF Qwen3 has no MLP bias (false only)"),
    },
    "phi3": {
        "attention_bias": (_is_false, "HF Phi-3 has no attention bias (false only)"),
        "mlp_bias": (_is_false, "HF Phi-3 has no MLP bias (false only)"),
    },
    "mixtral": {
        "attention_bias": (_is_false, "HF Mixtral has no attention bias (false only)"),
        "mlp_bias": (_is_false, "HF Mixtral has no MLP bias (false only)"),
    },
    "qwen2_moe": {
        "mlp_bias": (_is_false, "HF Qwen2-MoE has no MLP bias (false only)"),
    },
    "qwen3_moe": {
        "mlp_bias": (_is_false, "HF Qwen3-MoE has no MLP bias (false only)"),
    },
    "gemma2": {
        "mlp_bias": (_is_false, "HF Gemma2 has no MLP bias (false only)"),
        "use_bidirectional_attention": (_is_false, "only causal attention is supported (false only)"),
    },
    "gemma3_text": {
        "mlp_bias": (_is_false, "HF Gemma3 has no MLP bias (false only)"),
        "use_bidirectional_attention": (_is_false, "only causal attention is supported (false only)"),
    },
}

# transformers 5.23 defaults where the architectures differ (used when the key is absent)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "head_dim": 128},
    "phi3": {"num_key_value_heads": None, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "mixtral": {
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2_moe": {
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
    },
    "gemma2": {
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": {
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    },
    "qwen3_moe": {
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
}

# architectures whose HF RoPE reads partial_rotary_factor (elsewhere: DEFAULT_ONLY 1.0)
_PARTIAL_ROTARY_ARCHS = ("phi3",)

# RoPE parameters per rope type: required keys (beyond rope_type/type and rope_theta)
_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor"),
}
# optional RoPE parameters per rope type
_ROPE_OPTIONAL: dict[str, tuple[str, ...]] = {
    "longrope": ("factor", "attention_factor", "original_max_position_embeddings"),
}
# architectures whose HF model implements longrope (Phi3Config also renames the legacy su / yarn)
_LONGROPE_ARCHS = ("phi3",)
_LONGROPE_LEGACY = ("su", "yarn")


def key_role(model_type: str, key: str) -> KeyRole | None:
    """How ``key`` of a ``model_type`` config is treated; None = unknown (refused)."""
    if key in _USED_BY_ARCH[model_type]:
        return KeyRole.USED
    if (
        key in INERT_KEYS or key in _INERT_BY_ARCH[model_type] or key.startswith("_")
    ):  # "_name_or_path", "_commit_hash"...: bookkeeping
        return KeyRole.INERT
    if key in _DEFAULT_ONLY_COMMON or key in _DEFAULT_ONLY_BY_ARCH[model_type]:
        return KeyRole.DEFAULT_ONLY
    return None


def classify_keys(d: Mapping[str, Any]) -> dict[str, KeyRole]:
    """Role of every key of the raw config ``d``; raises UnsupportedModelConfigError on an unknown
    key or a DEFAULT_ONLY key with another value."""
    mt = _model_type(d)
    roles: dict[str, KeyRole] = {}
    for key in sorted(d):
        role = key_role(mt, key)
        if role is None:
            raise UnsupportedModelConfigError(
                mt, key, d[key], "unknown field; it could change the computation, so the model is refused"
            )
        if role is KeyRole.DEFAULT_ONLY:
            ok, why = _DEFAULT_ONLY_BY_ARCH[mt].get(key) or _DEFAULT_ONLY_COMMON[key]
            if not ok(d[key]):
                raise UnsupportedModelConfigError(mt, key, d[key], why)
        roles[key] = role
    return roles


def _model_type(d: Mapping[str, Any]) -> str:
    mt = d.get("model_type", "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InvalidRequestError(
            f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return mt


def _rope(mt: str, d: Mapping[str, Any], label: str | None = None) -> RopeConfig:
    """HF's precedence: ``rope_scaling`` (legacy) over ``rope_parameters``; top-level
    ``rope_theta`` fills in a missing theta. ``label``: the field named in errors (default: the
    key read)."""
    src = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if not isinstance(d.get(src) or {}, dict):
        raise UnsupportedModelConfigError(mt, src, d.get(src), "expected an object")
    rp = dict(d.get(src) or {})
    src = label or src
    if any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedModelConfigError(mt, src, rp, "per-layer-type RoPE parameters are not supported")
    kind = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    legacy = mt in _LONGROPE_ARCHS and kind in _LONGROPE_LEGACY
    if legacy:  # Phi3Config.convert_rope_params_to_dict renames them
        kind = "longrope"
    if kind == "longrope" and mt not in _LONGROPE_ARCHS:
        raise UnsupportedModelConfigError(
            mt, f"{src}.rope_type", kind, f"longrope is implemented for {', '.join(_LONGROPE_ARCHS)} only"
        )
    if kind not in _ROPE_KEYS:
        raise UnsupportedModelConfigError(
            mt, f"{src}.rope_type", kind, f"supported RoPE types: {', '.join(_ROPE_KEYS)}"
        )
    theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
    # Phi3Config: rope_parameters.partial_rotary_factor, else the top-level key (setdefault)
    prf: Any = 1.0
    if mt in _PARTIAL_ROTARY_ARCHS:
        prf = rp.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if isinstance(prf, bool) or not isinstance(prf, int | float) or not 0.0 < prf <= 1.0:
            raise UnsupportedModelConfigError(mt, "partial_rotary_factor", prf, "expected a number in (0, 1]")
    need = _ROPE_KEYS[kind]
    known = need + _ROPE_OPTIONAL.get(kind, ())
    for k in need:
        if k not in rp:
            raise UnsupportedModelConfigError(mt, f"{src}.{k}", None, f"RoPE type {kind!r} requires it")
    for k, v in rp.items():
        if k not in known:
            raise UnsupportedModelConfigError(
                mt,
                f"{src}.{k}",
                v,
                f"unknown parameter for RoPE type {kind!r} (known: {', '.join(known) or 'none'})",
            )
    if kind == "longrope":
        return _longrope(mt, d, rp, src, theta, float(prf), legacy)
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(rp.get("factor", 1.0)),
        low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 8192)),
        partial_rotary_factor=float(prf),
    )


def _number(mt: str, key: str, v: Any, minimum: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= minimum:
        raise UnsupportedModelConfigError(mt, key, v, f"expected a number > {minimum}")
    return float(v)


def _longrope(
    mt: str, d: Mapping[str, Any], rp: Mapping[str, Any], src: str, theta: float, prf: float, legacy: bool
) -> RopeConfig:
    """Phi-3 LongRoPE, as transformers 5.23 computes it (``_compute_longrope_parameters``):

    * ``original_max_position_embeddings`` (omax): for ``rope_type: longrope`` Phi3Config's
      top-level field (default 4096) overrides the one in the RoPE parameters; for the legacy
      ``su``/``yarn`` names only the RoPE parameters' own value is read (HF requires it there);
    * ``factor``: given, else ``max_position_embeddings / omax``; ``attention_factor``: given,
      else ``sqrt(1 + ln(factor) / ln(omax))`` when ``factor > 1``, else 1;
    * inverse frequencies ``1 / (ext * theta ** (2i / dim))`` with ``ext = short_factor`` while the
      sequence has at most omax tokens, ``long_factor`` past it (the switch:
      :meth:`ModelConfig.check_max_positions`).
    """
    if legacy:
        if "original_max_position_embeddings" not in rp:
            raise UnsupportedModelConfigError(
                mt,
                f"{src}.original_max_position_embeddings",
                None,
                "the legacy su/yarn RoPE types read it from the RoPE parameters (transformers requires it)",
            )
        omax_raw = rp["original_max_position_embeddings"]
    else:
        omax_raw = d.get("original_max_position_embeddings", 4096)
        if "original_max_position_embeddings" in rp and rp["original_max_position_embeddings"] != omax_raw:
            raise UnsupportedModelConfigError(
                mt,
                f"{src}.original_max_position_embeddings",
                rp["original_max_position_embeddings"],
                f"transformers uses the top-level original_max_position_embeddings ({omax_raw}) instead; "
                "they disagree",
            )
    omax = _pos_int(mt, "original_max_position_embeddings", omax_raw, minimum=2)
    if rp.get("factor") is not None:
        factor = _number(mt, f"{src}.factor", rp["factor"])
    else:
        max_pos = d.get("max_position_embeddings", _HF_DEFAULTS[mt]["max_position_embeddings"])
        factor = _pos_int(mt, "max_position_embeddings", max_pos) / omax
    if rp.get("attention_factor") is not None:
        attention_factor = _number(mt, f"{src}.attention_factor", rp["attention_factor"])
    else:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omax))
    factors = {}
    for key in ("short_factor", "long_factor"):
        v = rp[key]
        if (
            not isinstance(v, list)
            or not v
            or any(isinstance(x, bool) or not isinstance(x, int | float) for x in v)
        ):
            raise UnsupportedModelConfigError(mt, f"{src}.{key}", v, "expected a list of numbers")
        factors[key] = tuple(float(x) for x in v)
    return RopeConfig(
        theta=theta,
        kind="longrope",
        factor=factor,
        original_max_position_embeddings=omax,
        partial_rotary_factor=prf,
        short_factor=factors["short_factor"],
        long_factor=factors["long_factor"],
        attention_factor=attention_factor,
    )


def _gemma3_ropes(d: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """RoPE of Gemma3's full-attention and sliding layers (``Gemma3TextConfig``): nested
    ``rope_parameters`` per layer type; missing thetas from ``rope_theta`` (full, default 1e6) and
    ``rope_local_base_freq`` (sliding, default 1e4); legacy ``rope_scaling`` applies to full only."""
    mt = "gemma3_text"
    rp = d.get("rope_parameters")
    if rp is not None and (
        not isinstance(rp, dict) or any(not isinstance(v, dict | None) for v in rp.values())
    ):
        raise UnsupportedModelConfigError(
            mt,
            "rope_parameters",
            rp,
            f"expected an object per layer type ({FULL_ATTENTION}, {SLIDING_ATTENTION})",
        )
    rp = dict(rp or {})
    extra = sorted(set(rp) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if extra:
        raise UnsupportedModelConfigError(mt, "rope_parameters", rp, f"unknown layer types {extra}")
    full = dict(rp.get(FULL_ATTENTION) or {"rope_type": "default"})
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise UnsupportedModelConfigError(mt, "rope_scaling", scaling, "expected an object")
    full.update(scaling or {})
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local = dict(rp.get(SLIDING_ATTENTION) or {"rope_type": "default"})
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return (
        _rope(mt, {"rope_parameters": full}, f"rope_parameters.{FULL_ATTENTION}"),
        _rope(mt, {"rope_parameters": local}, f"rope_parameters.{SLIDING_ATTENTION}"),
    )


def _gemma_windows(mt: str, d: Mapping[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Gemma 2/3: ``layer_types``, else every ``sliding_window_pattern``-th layer (Gemma3: default
    6; Gemma2: always 2, it has no such key) is full attention and the others are windowed by
    ``sliding_window`` (default 4096)."""
    if d.get("layer_types") is not None:
        types = _layer_types(mt, d["layer_types"], n_layers)
    else:
        pattern = (
            2
            if mt == "gemma2"
            else _pos_int(mt, "sliding_window_pattern", d.get("sliding_window_pattern", 6))
        )
        types = tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n_layers))
    w = _window_value(mt, "sliding_window", d.get("sliding_window", 4096))
    if w is None and SLIDING_ATTENTION in types:
        raise UnsupportedModelConfigError(
            mt, "sliding_window", None, "sliding_attention layers need a window"
        )
    return tuple(w if t == SLIDING_ATTENTION else None for t in types)


def _layer_types(mt: str, raw: Any, n_layers: int) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) != n_layers:
        raise UnsupportedModelConfigError(
            mt, "layer_types", raw, f"expected a list of {n_layers} entries (one per layer)"
        )
    out = tuple(_LAYER_TYPE_ALIASES.get(t, t) for t in raw)
    bad = sorted({t for t in out if t not in (FULL_ATTENTION, SLIDING_ATTENTION)})
    if bad:
        raise UnsupportedModelConfigError(
            mt,
            "layer_types",
            raw,
            f"layer types {bad} are not supported ({FULL_ATTENTION}, {SLIDING_ATTENTION})",
        )
    return out


def _window_value(mt: str, key: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UnsupportedModelConfigError(mt, key, v, "expected a positive integer or null")
    return v


def _layer_windows(mt: str, d: Mapping[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window (None = full attention), as transformers 5.23 decides it."""
    if mt == "llama":
        return (None,) * n_layers
    if mt in ("phi3", "mixtral"):  # every layer windowed by sliding_window (HF default: null)
        return (_window_value(mt, "sliding_window", d.get("sliding_window")),) * n_layers
    if mt == "qwen3_moe":  # every layer, only with use_sliding_window (Qwen3MoeConfig)
        use = d.get("use_sliding_window", False)
        if not isinstance(use, bool):
            raise UnsupportedModelConfigError(mt, "use_sliding_window", use, "expected true or false")
        return (
            _window_value(mt, "sliding_window", d.get("sliding_window", 4096)) if use else None,
        ) * n_layers
    if mt == "qwen2_moe":
        return _qwen2_moe_windows(d, n_layers)
    if mt in GEMMA_MODEL_TYPES:
        return _gemma_windows(mt, d, n_layers)
    if mt == "mistral":
        w = _window_value(mt, "sliding_window", d.get("sliding_window", 4096))
        if "layer_types" in d and d["layer_types"] is not None:
            # HF Mistral ignores layer_types: accept it only when it says the same thing
            want = SLIDING_ATTENTION if w is not None else FULL_ATTENTION
            got = _layer_types(mt, d["layer_types"], n_layers)
            if any(t != want for t in got):
                raise UnsupportedModelConfigError(
                    mt,
                    "layer_types",
                    d["layer_types"],
                    f"HF Mistral applies sliding_window={w} to every layer and ignores layer_types; "
                    "per-layer types on Mistral are refused",
                )
        return (w,) * n_layers
    # qwen2, qwen3
    use = d.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise UnsupportedModelConfigError(mt, "use_sliding_window", use, "expected true or false")
    w = _window_value(mt, "sliding_window", d.get("sliding_window", 4096)) if use else None
    if d.get("layer_types") is not None:
        types = _layer_types(mt, d["layer_types"], n_layers)
        if w is None and SLIDING_ATTENTION in types:
            raise UnsupportedModelConfigError(
                mt,
                "layer_types",
                d["layer_types"],
                "names sliding_attention layers but no window is set (use_sliding_window is false "
                "or sliding_window is null)",
            )
    else:
        mwl = d.get("max_window_layers", 28)
        if isinstance(mwl, bool) or not isinstance(mwl, int) or mwl < 0:
            raise UnsupportedModelConfigError(mt, "max_window_layers", mwl, "expected an integer >= 0")
        types = tuple(
            SLIDING_ATTENTION if w is not None and i >= mwl else FULL_ATTENTION for i in range(n_layers)
        )
    return tuple(w if t == SLIDING_ATTENTION else None for t in types)


def _qwen2_moe_windows(d: Mapping[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Qwen2MoeConfig: the window applies only with ``use_sliding_window``; layer ``i`` is windowed
    when ``layer_types[i]`` says so, else when ``i`` is even and ``i < max_window_layers``."""
    mt = "qwen2_moe"
    use = d.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise UnsupportedModelConfigError(mt, "use_sliding_window", use, "expected true or false")
    w = _window_value(mt, "sliding_window", d.get("sliding_window", 4096)) if use else None
    if d.get("layer_types") is not None:
        types = _layer_types(mt, d["layer_types"], n_layers)
        if w is None and SLIDING_ATTENTION in types:
            raise UnsupportedModelConfigError(
                mt,
                "layer_types",
                d["layer_types"],
                "names sliding_attention layers but no window is set (use_sliding_window is false "
                "or sliding_window is null)",
            )
    else:
        mwl = d.get("max_window_layers", 28)
        if isinstance(mwl, bool) or not isinstance(mwl, int) or mwl < 0:
            raise UnsupportedModelConfigError(mt, "max_window_layers", mwl, "expected an integer >= 0")
        types = tuple(
            SLIDING_ATTENTION if w is not None and (i + 1) % 2 and i < mwl else FULL_ATTENTION
            for i in range(n_layers)
        )
    return tuple(w if t == SLIDING_ATTENTION else None for t in types)


def _pos_int(mt: str, key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise UnsupportedModelConfigError(mt, key, v, f"expected an integer >= {minimum}")
    return v


def _moe(mt: str, d: Mapping[str, Any], n_layers: int) -> MoEConfig | None:
    """The MoE block of a mixtral / qwen2_moe / qwen3_moe config (None for dense families)."""
    if mt not in MOE_MODEL_TYPES:
        return None
    hf = _HF_DEFAULTS[mt]
    if mt == "mixtral" or "num_local_experts" in d:
        # num_experts is an alias of num_local_experts (attribute_map) on Mixtral and Qwen3-MoE
        n = d.get(
            "num_local_experts", d.get("num_experts", hf.get("num_local_experts", hf.get("num_experts")))
        )
        if "num_experts" in d and "num_local_experts" in d and d["num_experts"] != d["num_local_experts"]:
            raise UnsupportedModelConfigError(
                mt,
                "num_experts",
                d["num_experts"],
                f"disagrees with num_local_experts={d['num_local_experts']}",
            )
        n_key = "num_local_experts" if "num_local_experts" in d else "num_experts"
    else:
        n, n_key = d.get("num_experts", hf["num_experts"]), "num_experts"
    n = _pos_int(mt, n_key, n)
    k = _pos_int(mt, "num_experts_per_tok", d.get("num_experts_per_tok", hf["num_experts_per_tok"]))
    if k > n:
        raise UnsupportedModelConfigError(mt, "num_experts_per_tok", k, f"more than the {n} experts")
    if mt == "mixtral":  # MixtralTopKRouter always renormalises; every layer is sparse
        inter = _pos_int(mt, "intermediate_size", d["intermediate_size"])
        return MoEConfig(n, k, inter, True, (True,) * n_layers, 0, fp32_weights=True)
    inter = _pos_int(mt, "moe_intermediate_size", d.get("moe_intermediate_size", hf["moe_intermediate_size"]))
    norm = d.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise UnsupportedModelConfigError(mt, "norm_topk_prob", norm, "expected true or false")
    step = _pos_int(mt, "decoder_sparse_step", d.get("decoder_sparse_step", 1))
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise UnsupportedModelConfigError(mt, "mlp_only_layers", only, "expected a list of layer indices")
    sparse = tuple(i not in only and (i + 1) % step == 0 for i in range(n_layers))
    shared = 0
    if mt == "qwen2_moe":
        shared = _pos_int(
            mt,
            "shared_expert_intermediate_size",
            d.get("shared_expert_intermediate_size", hf["shared_expert_intermediate_size"]),
        )
    return MoEConfig(n, k, inter, norm, sparse, shared)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2 always, Llama attention_bias)
    o_proj_bias: bool = False  # o_proj carries a bias (Llama attention_bias; never Qwen2)
    mlp_bias: bool = False  # gate/up/down carry a bias (Llama mlp_bias)
    hidden_act: str = "silu"
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window in tokens, None = full
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Qwen3-MoE, Gemma3)
    rope_local: RopeConfig | None = None  # RoPE of the sliding layers when it differs (Gemma3)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)
    # attention scores (scaled q.k) = cap * tanh(score / cap) before the mask and softmax (Gemma)
    attn_logit_softcapping: float | None = None
    moe: MoEConfig | None = None  # mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE)
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelConfigError(
                self.model_type,
                "hidden_act",
                self.hidden_act,
                f"supported activations: {', '.join(SUPPORTED_ACTIVATIONS)}",
            )
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_hidden_layers)
        if len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_hidden_layers} layers"
            )

    def check_max_positions(self, max_positions: int) -> None:
        """Refuse serving sequences of up to ``max_positions`` tokens where the output could not
        equal transformers'. LongRoPE: transformers rotates the tokens of a forward pass with
        ``long_factor`` once the sequence passes ``original_max_position_embeddings`` tokens,
        keeping the keys it cached before with ``short_factor``; which keys are short or long
        then depends on how the sequence was split into forward passes (one prefill, or chunks,
        or prefix-cache hits computed for another request), which a paged KV cache cannot
        reproduce. Within ``original_max_position_embeddings`` every token uses
        ``short_factor``, exactly as transformers, so that is what is served."""
        r = self.rope
        if r.kind == "longrope" and max_positions > r.original_max_position_embeddings:
            raise UnsupportedModelConfigError(
                self.model_type,
                "rope_parameters.long_factor",
                f"max_model_len {max_positions}",
                "longrope switches from short_factor to long_factor for sequences longer than "
                f"original_max_position_embeddings={r.original_max_position_embeddings}, and the keys "
                "already cached keep the factor they were computed with; the paged KV cache cannot "
                "reproduce transformers' output across that switch. Serve with max_model_len <= "
                f"{r.original_max_position_embeddings} (short_factor only)",
            )

    # ------------------------------------------------------------------ windows
    @property
    def windows(self) -> frozenset[int]:
        """The distinct sliding windows of the model's layers (empty: no windowed layer)."""
        return frozenset(w for w in self.layer_windows if w is not None)

    @property
    def kv_window(self) -> int | None:
        """The window the KV cache may trim to: set only when **every** layer is windowed (then
        KV older than the largest window is never read again); None when any layer attends to
        the whole sequence, since that layer still needs every block."""
        if not self.layer_windows or any(w is None for w in self.layer_windows):
            return None
        return max(self.layer_windows)  # type: ignore[type-var]

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse a raw config.json dict; refuses (naming the field and value) whatever could make
        the output differ from transformers' (see the module docstring)."""
        mt = _model_type(d)
        classify_keys(d)
        arch = d.get("architectures")
        if arch is not None and (
            not isinstance(arch, list) or any(not str(a).endswith("ForCausalLM") for a in arch)
        ):
            raise UnsupportedModelConfigError(
                mt, "architectures", arch, "only *ForCausalLM checkpoints are supported"
            )
        hf = _HF_DEFAULTS[mt]
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        n_layers = int(d["num_hidden_layers"])
        eos = d.get("eos_token_id")
        eos_ids = (
            tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        )
        if mt == "llama":
            attn_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
            qkv_bias, o_bias = attn_bias, attn_bias  # HF Llama: q, k, v and o_proj
        elif mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False  # HF Qwen2: q/k/v bias=True, o_proj False
        elif mt in ("qwen3", "qwen3_moe", *GEMMA_MODEL_TYPES):  # HF: attention_bias on q, k, v and o_proj
            qkv_bias = o_bias = _bool(mt, "attention_bias", d.get("attention_bias", False))
            mlp_bias = False
        elif mt == "qwen2_moe":  # HF Qwen2-MoE: q/k/v bias from qkv_bias (default true), no o_proj bias
            qkv_bias, o_bias, mlp_bias = _bool(mt, "qkv_bias", d.get("qkv_bias", True)), False, False
        else:
            qkv_bias = o_bias = mlp_bias = False
        head_dim = int(d.get("head_dim") or hf.get("head_dim") or hidden // heads)
        extra: dict[str, Any] = {}
        act = str(d.get("hidden_act", "silu"))
        if mt in GEMMA_MODEL_TYPES:
            if mt == "gemma3_text":
                rope, extra["rope_local"] = _gemma3_ropes(d)
            else:  # Gemma2: one RoPE for every layer
                rope = _rope(mt, d)
            act = str(d.get("hidden_activation", "gelu_pytorch_tanh"))
            if act not in SUPPORTED_ACTIVATIONS:
                raise UnsupportedModelConfigError(
                    mt, "hidden_activation", act, f"supported activations: {', '.join(SUPPORTED_ACTIVATIONS)}"
                )
            if d.get("hidden_act") not in (None, act):  # Gemma reads hidden_activation only
                raise UnsupportedModelConfigError(
                    mt,
                    "hidden_act",
                    d["hidden_act"],
                    f"Gemma uses hidden_activation ({act!r}); they disagree",
                )
            scalar = d.get("query_pre_attn_scalar", hf["query_pre_attn_scalar"])
            if isinstance(scalar, bool) or not isinstance(scalar, int | float) or scalar <= 0:
                raise UnsupportedModelConfigError(
                    mt, "query_pre_attn_scalar", scalar, "expected a positive number"
                )
            extra["attn_scale"] = float(scalar) ** -0.5
            for key in ("final_logit_softcapping", "attn_logit_softcapping"):
                cap = d.get(key, hf[key])  # absent: the HF default (Gemma2 30 / 50, Gemma3 none)
                if cap is not None and (
                    isinstance(cap, bool) or not isinstance(cap, int | float) or cap <= 0
                ):
                    raise UnsupportedModelConfigError(mt, key, cap, "expected a positive number or null")
                extra[key] = None if cap is None else float(cap)
        else:
            rope = _rope(mt, d)
        rd = rope.rotary_dim(head_dim)
        if rd % 2 or rd < 2:
            raise UnsupportedModelConfigError(
                mt,
                "partial_rotary_factor",
                rope.partial_rotary_factor,
                f"rotates {rd} of head_dim {head_dim} dims; an even number >= 2 is required",
            )
        for key in ("short_factor", "long_factor"):
            got = getattr(rope, key)
            if rope.kind == "longrope" and len(got) != rd // 2:
                raise UnsupportedModelConfigError(
                    mt,
                    f"rope_parameters.{key}",
                    list(got),
                    f"expected {rd // 2} numbers (one per rotated frequency: {rd} rotated dims / 2)",
                )
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads", hf["num_key_value_heads"]) or heads),
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings", hf["max_position_embeddings"])),
            rms_norm_eps=float(d.get("rms_norm_eps", hf.get("rms_norm_eps", 1e-6))),
            rope=rope,
            qkv_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            hidden_act=act,
            layer_windows=_layer_windows(mt, d, n_layers),
            qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"),
            moe=_moe(mt, d, n_layers),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **extra,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelNotFoundError(f"no config.json in {str(path)!r}")
        return cls.from_dict(json.loads(p.read_text()))
