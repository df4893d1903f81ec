"""Model configuration parsed from an HF ``config.json`` (Llama family)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidRequestError, ModelNotFoundError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise InvalidRequestError(
                f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        kind = rp.get("rope_type", rp.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3"):
            raise InvalidRequestError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
        rope = RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(rp.get("factor", 1.0)),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 8192)),
        )
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            attention_bias=bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelNotFoundError(f"no config.json in {str(path)!r}")
        return cls.from_dict(json.loads(p.read_text()))
