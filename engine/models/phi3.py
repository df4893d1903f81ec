"""Phi-3 (``model_type: phi3``): the Llama decoder with fused checkpoint tensors.

HF ``Phi3Attention`` holds one ``qkv_proj`` ``[(h + 2*kvh) * head_dim, hidden]`` (q rows, then k,
then v) and ``Phi3MLP`` one ``gate_up_proj`` ``[2 * intermediate, hidden]`` (gate rows, then up;
``down(up * act(gate))``), no biases. Those are exactly the layouts the Llama modules use once
fused (``Attention.qkv``, ``MLP.gate_up``), so the modules are built fused and the loader maps
``qkv_proj`` -> ``qkv`` and ``gate_up_proj`` -> ``gate_up``; ``fuse`` has nothing left to do.
Partial rotary (``partial_rotary_factor``) is in engine.models.rope; resid/embd dropout are
training-only. Tensor parallelism shards the fused tensors as for Llama (engine.models.tp_shard).
"""

from __future__ import annotations

from torch import nn

from engine.models.config import ModelConfig
from engine.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


class FusedAttention(Attention):
    """Attention built with the fused ``qkv`` projection (no q/k/v_proj)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.hd, bias=cfg.qkv_bias)

    def fuse(self) -> None:
        """Already fused."""


class FusedMLP(MLP):
    """Gated MLP built with the fused ``gate_up`` projection (no gate_proj/up_proj)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.gate_proj, self.up_proj
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)

    def fuse(self) -> None:
        """Already fused."""


class Phi3DecoderLayer(DecoderLayer):
    def make_attention(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return FusedAttention(cfg, layer_idx)

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return FusedMLP(cfg)


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_cls = Phi3DecoderLayer
    checkpoint_renames = (
        (".self_attn.qkv_proj.", ".self_attn.qkv."),
        (".mlp.gate_up_proj.", ".mlp.gate_up."),
    )
