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


def make_tiny_models(root: Path, tokenizer_from: Path | None = None) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in _configs().items():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # larger weights -> peaky logits -> fewer near-ties in greedy tests
            for pname, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.08)
                elif name in RANDOM_BIAS and pname.endswith(".bias"):
                    p.normal_(0, 0.1)
        d = root / name
        model.save_pretrained(d, safe_serialization=True)
        if tokenizer_from is not None:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tokenizer_from / f, d / f)
        out[name] = d
    return out
