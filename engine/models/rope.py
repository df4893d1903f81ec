"""Rotary position embeddings (HF "rotate_half" convention), with linear, Llama-3 and LongRoPE
scaling.

LongRoPE (Phi-3, ``RopeConfig.kind == "longrope"``): the tables use ``short_factor`` (the
frequencies transformers uses while a sequence has at most ``original_max_position_embeddings``
tokens; the model refuses longer sequences, see ``ModelConfig.check_max_positions``) and are
multiplied by ``attention_factor``, as transformers multiplies its cos/sin.

Partial rotary (``RopeConfig.partial_rotary_factor`` < 1, Phi-3): the tables cover the first
``rotary_dim`` dims of a head; :func:`apply_rotary` rotates those and passes the rest through,
as HF's ``apply_rotary_pos_emb`` does.
"""

from __future__ import annotations

import math

import torch

from engine.models.config import RopeConfig


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies of ``head_dim`` rotated dims (LongRoPE: with ``short_factor``)."""
    if rope.kind == "longrope":  # transformers' _compute_longrope_parameters, short sequences
        ext = torch.tensor(rope.short_factor, dtype=torch.float32)
        shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (ext * rope.theta**shape)
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position, ``rope.rotary_dim(head_dim)``
    wide."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv = inv_frequencies(rope.rotary_dim(head_dim), rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope.attention_factor  # 1.0 except LongRoPE
        cos, sin = (emb.cos(), emb.sin()) if scale == 1.0 else (emb.cos() * scale, emb.sin() * scale)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim] for broadcasting over heads."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` (all of them unless partial rotary)."""
    rd = cos.shape[-1]
    if rd != x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
