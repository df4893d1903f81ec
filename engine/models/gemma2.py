"""Gemma 2 (``model_type: gemma2``, ``Gemma2ForCausalLM``).

Gemma 3's text model (engine.models.gemma3) minus its q/k norms and its second RoPE, as
transformers 5.23's ``modeling_gemma2``:

* :class:`~engine.models.gemma3.GemmaRMSNorm` everywhere (``(1 + w)``, in float32), four norms
  per layer, embeddings scaled by ``sqrt(hidden_size)``, GeGLU MLP (``hidden_activation``);
* softmax scale ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``);
* attention logit soft-capping (``attn_logit_softcapping``, default 50): every scaled score
  ``s`` becomes ``cap * tanh(s / cap)`` before the mask and softmax, in every attention path of
  :mod:`engine.attention` (the native decode kernel included);
* final logit soft-capping (``final_logit_softcapping``, default 30);
* alternating local/global layers: ``layer_types``, else the even-numbered layers are windowed
  by ``sliding_window`` (default 4096) and the odd ones attend to the whole sequence; one RoPE
  (``rope_parameters``) for all layers.

Tensor parallelism: the caps act per score and per logit, so the Llama sharding applies.
"""

from __future__ import annotations

from torch import nn

from engine.models.config import ModelConfig
from engine.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from engine.models.llama import Attention


class Gemma2Attention(Attention):
    """Llama attention with Gemma's softmax scale (the cap comes from the config, as for every
    attention module)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        if cfg.attn_scale is not None:
            self.scale = cfg.attn_scale


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    def make_attention(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return Gemma2Attention(cfg, layer_idx)


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 3's causal LM with Gemma 2 layers; one RoPE table (``ModelConfig.rope_local`` is None,
    so the sliding layers use the global table)."""

    layer_cls = Gemma2DecoderLayer
