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
    }


def make_tiny_models(root: Path, tokenizer_from: Path | None = None) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in _configs().items():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # larger weights -> peaky logits -> fewer near-ties in greedy tests
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.08)
        d = root / name
        model.save_pretrained(d, safe_serialization=True)
        if tokenizer_from is not None:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tokenizer_from / f, d / f)
        out[name] = d
    return out
