"""Build tiny random-weight HF checkpoints of each supported architecture (test helper)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama3_rope": LlamaConfig(
            **COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
        ),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1000000.0),
        "mistral": MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False),
        # every layer windowed: out-of-window KV blocks are freed (window < most test prompts)
        "mistral_swa": MistralConfig(**COMMON, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False),
        # Qwen2 mixed layers: layer 0 full attention, layer 1 windowed (max_window_layers=1)
        "qwen2_swa": Qwen2Config(
            **COMMON,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=1,
            tie_word_embeddings=False,
        ),
        # another activation and every Llama bias (q/k/v/o_proj and gate/up/down)
        "llama_gelu_bias": LlamaConfig(
            **COMMON,
            hidden_act="gelu_pytorch_tanh",
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
    }


SLIDING_WINDOW = 24
# models whose biases get random values too (HF initialises biases to zero, which would hide them)
RANDOM_BIAS = {"mistral_swa", "qwen2_swa", "llama_gelu_bias"}


def randomize_(model: torch.nn.Module, *, biases: bool = False, norms: bool = False) -> torch.nn.Module:
    """Redraw ``model``'s parameters in place from torch's current RNG, in ``named_parameters``
    order: every matrix ~ N(0, 0.08) (larger than HF's init: peaky logits, fewer near-ties in
    greedy tests); with ``biases``, every ``*.bias`` ~ N(0, 0.1) (HF's zeros would hide them); with
    ``norms``, every other vector (norm weights, q/k norms) ~ N(1, 0.2) (not all ones). Parameters
    not drawn consume no random numbers. Returns ``model``."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif biases and pname.endswith(".bias"):
                p.normal_(0, 0.1)
            elif norms and not pname.endswith(".bias"):
                p.normal_(1.0, 0.2)
    return model


def random_model(cfg, seed: int, *, biases: bool = False, norms: bool = False) -> torch.nn.Module:
    """An fp32 transformers model of config ``cfg`` with :func:`randomize_` weights drawn from
    ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return randomize_(model, biases=biases, norms=norms)


def save_random_models(root: Path, configs: dict, *, seed: int = 1234) -> dict[str, Path]:
    """Each of ``configs`` (name -> transformers config) as :func:`random_model` (seed ``seed``,
    biases and norms drawn too) saved as safetensors in ``root/name``; name -> folder."""
    out = {}
    for name, cfg in configs.items():
        random_model(cfg, seed, biases=True, norms=True).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def make_tiny_models(root: Path, tokenizer_from: Path | None = None) -> dict[str, Path]:
    out = {}
    for name, cfg in _configs().items():
        model = random_model(cfg, 1234, biases=name in RANDOM_BIAS)
        d = root / name
        model.save_pretrained(d, safe_serialization=True)
        if tokenizer_from is not None:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tokenizer_from / f, d / f)
        out[name] = d
    return out
