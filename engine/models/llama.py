"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 with QKV bias, SmolLM2) over a paged KV cache.

What the config selects (engine.models.config parses and refuses the rest): the gated MLP's
activation (``hidden_act``, computed exactly as HF's ``ACT2FN``), biases (q/k/v, o_proj, MLP),
and each layer's sliding window (``ModelConfig.layer_windows``; the mask is in
:mod:`engine.attention`).

Weights keep HF names so safetensors load directly; q/k/v and gate/up are fused at load time
(``fuse_weights``) to cut per-step kernel launches. ``forward`` takes a flattened batch of
tokens (see :mod:`engine.attention`) and returns final hidden states ``[T, hidden]``;
``compute_logits`` projects only the rows that will be sampled. Every projection is called
through :func:`engine.models.gemm.project`: batches above the small-batch kernel's rows (prefill
chunks) take the fp32 GEMM chosen there (oneDNN on the CPU), smaller ones the module itself.

Tensor parallelism (:mod:`engine.models.tp_shard`): a shard holds ``1/tp`` of the attention heads
and of the MLP's intermediate columns; ``o_proj`` and ``down_proj`` then produce partial sums,
which the modules' ``all_reduce`` hook (None when unsharded) sums across the ranks in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine import attention_native
from engine.attention import AttentionMetadata, paged_attention
from engine.attention_backends import AttentionBackend
from engine.models import fused_native
from engine.models.config import ModelConfig
from engine.models.gemm import project
from engine.models.rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from engine.models.fused_plan import FusedPlan


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """HF ``NewGELUActivation`` (the tanh formula spelled out, as HF computes it)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# the same functions HF's ACT2FN[name] applies (tests compare them bit for bit)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_new,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation HF's ``ACT2FN[name]`` computes; KeyError for names not implemented (the
    config parser refuses those first)."""
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kvh * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kvh * self.hd, bias=b)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.window: int | None = cfg.layer_windows[layer_idx]  # sliding window; None = full
        self.qkv: nn.Linear | None = None
        self.scale = self.hd**-0.5
        self.softcap: float | None = cfg.attn_logit_softcapping  # Gemma's attention score cap
        self.all_reduce: Callable[[torch.Tensor], None] | None = None  # set on a TP shard

    def fuse(self) -> None:
        lin = nn.Linear(
            self.q_proj.in_features, (self.h + 2 * self.kvh) * self.hd, bias=self.q_proj.bias is not None
        )
        lin = lin.to(self.q_proj.weight.dtype).to(self.q_proj.weight.device)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            if lin.bias is not None:
                lin.bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        self.qkv = lin
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, cache, md: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is not None:
            q, k, v = project(self.qkv, x).split(
                [self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1
            )
        else:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        q = apply_rotary(q.view(t, self.h, self.hd), cos, sin)
        k = apply_rotary(k.view(t, self.kvh, self.hd), cos, sin)
        v = v.view(t, self.kvh, self.hd)
        o = paged_attention(q, k, v, cache, md, self.scale, self.window, self.softcap)
        out = project(self.o_proj, o.reshape(t, self.h * self.hd))
        if self.all_reduce is not None:
            self.all_reduce(out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)
        self.act = activation(cfg.hidden_act)
        self.gate_up: nn.Linear | None = None
        self.all_reduce: Callable[[torch.Tensor], None] | None = None  # set on a TP shard

    def fuse(self) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        has_bias = self.gate_proj.bias is not None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias).to(w.dtype).to(w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if has_bias:
                lin.bias.copy_(torch.cat([self.gate_proj.bias, self.up_proj.bias]))
        self.gate_up = lin
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = project(self.gate_up, x).chunk(2, dim=-1)
        else:
            g, u = project(self.gate_proj, x), project(self.up_proj, x)
        out = project(self.down_proj, self.act(g) * u)
        if self.all_reduce is not None:
            self.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Families that differ only in their attention or MLP module
    (engine.models.qwen3, phi3, moe) subclass it and override ``make_attention``/``make_mlp``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = self.make_attention(cfg, layer_idx)
        self.mlp = self.make_mlp(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def make_attention(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return Attention(cfg, layer_idx)

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return MLP(cfg)

    def forward(self, x, cos, sin, cache, md):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, md)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The causal LM every supported family shares; a family's subclass sets ``layer_cls`` and,
    where its checkpoint names differ from the modules', ``checkpoint_renames`` (substring ->
    replacement, applied by the loader to each tensor name)."""

    layer_cls: type[DecoderLayer] = DecoderLayer
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        cfg.check_max_positions(max_positions or cfg.max_position_embeddings)
        self.model = Backbone(cfg, self.layer_cls)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_weights(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    # ------------------------------------------------------------------ fused small ops (#17)
    fused: bool = False  # forward takes the fused native path for small batches (enable_fused)
    _fused_plan: FusedPlan | None = None  # the structure enable_fused recognised

    def fused_unsupported_reason(self) -> str | None:
        """Why this model cannot take the fused native forward (:mod:`engine.models.fused_native`),
        or None when it can. See :func:`fused_plan` for the structures it covers."""
        from engine.models.fused_plan import fused_plan

        return fused_plan(self)[1]

    def enable_fused(self, on: bool = True) -> None:
        """Take the fused native forward for batches of up to ``fused_native.FUSED_MAX_ROWS``
        rows (``on``), or torch's ops always; refused (ValueError naming why) where
        :meth:`fused_unsupported_reason` says it cannot run."""
        if on:
            from engine.models.fused_plan import fused_plan

            plan, why = fused_plan(self)
            if plan is None:
                raise ValueError(f"the fused native forward cannot run: {why}")
            self._fused_plan = plan
        self.fused = on

    def _fused_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        """:meth:`forward` with the small ops fused (same values up to rounding): per layer the
        qkv projection, [q/k norms +] RoPE + q copy + KV write (one call), attention (the native
        kernel called directly when every row is a decode on the native backend, else
        :func:`paged_attention`), o_proj, [post-attention norm +] residual add + RMSNorm (one
        call), gate_up, act(gate) * up (one call), down_proj, [post-feedforward norm +] residual
        add + the next RMSNorm (one call); the bracketed parts where the plan has them (Qwen3's
        and Gemma 3's q/k norms, Gemma's four norms). Index data is checked once here."""
        lib = fused_native.kernel()
        plan = self._fused_plan
        assert lib is not None and plan is not None  # enable_fused checked them
        cfg = self.config
        t = input_ids.shape[0]
        h_, kvh, hd = cfg.num_attention_heads, kv_caches.shape[4], cfg.head_dim
        if kvh != cfg.num_key_value_heads:
            raise ValueError(
                f"fused forward: cache holds {kvh} KV heads, the model {cfg.num_key_value_heads}"
            )
        nb, bs = kv_caches.shape[2], kv_caches.shape[3]
        if kv_caches.dtype != torch.float32 or not kv_caches.is_contiguous():
            raise ValueError("fused forward: the KV cache must be a contiguous float32 tensor")
        tables = [(r.cos, r.sin) for r in plan.rotaries]
        positions = positions.contiguous()
        fused_native.check_index("positions", positions, t, min(c.shape[0] for c, _ in tables))
        slots = md.slot_mapping.contiguous()
        fused_native.check_index("slot_mapping", slots, t, nb * bs)
        r = md.decode_rows
        direct = None
        if md.num_decodes == t and r is not None and md.decode_backend is AttentionBackend.NATIVE:
            direct = attention_native.rows_function(h_ // kvh, hd)
            if direct is None:
                raise RuntimeError(
                    f"the native decode kernel is unavailable: {attention_native.unavailable_reason()}"
                )
            for name, x in (
                ("tables", r.tables),
                ("row", r.row),
                ("hi", r.hi),
                ("first", r.first),
                *r.lo.items(),
            ):
                if x.dtype != torch.int64 or not x.is_contiguous() or x.device.type != "cpu":
                    raise ValueError(f"decode_rows.{name} must be a contiguous int64 CPU tensor")
            if r.row.shape != (t,) or r.tables.dim() != 2:
                raise ValueError(f"decode_rows: row {tuple(r.row.shape)} != ({t},)")
        layers = self.model.layers
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        pone = int(plan.plus_one)
        res = self.model.embed_tokens(input_ids)
        if plan.embed_scale:  # Gemma: as its forward, the scale cast to the model dtype
            res = res * torch.tensor(hidden**0.5, dtype=res.dtype)
        res = res.contiguous()
        x = torch.empty_like(res)
        q = torch.empty(t, h_, hd)
        o = torch.empty(t, h_, hd)
        act = torch.empty(t, inter)
        p_res, p_x, p_q, p_o, p_act = res.data_ptr(), x.data_ptr(), q.data_ptr(), o.data_ptr(), act.data_ptr()
        p_pos, p_slots = positions.data_ptr(), slots.data_ptr()
        p_tables = [(c.data_ptr(), s.data_ptr(), c.shape[1]) for c, s in tables]
        cache0 = kv_caches.data_ptr()
        layer_bytes, half_bytes = kv_caches.stride(0) * 4, kv_caches.stride(1) * 4
        qkv_width = (h_ + 2 * kvh) * hd
        norm0 = layers[0].input_layernorm
        lib.add_rmsnorm_f32(None, None, 0.0, p_res, norm0.weight.data_ptr(), t, hidden, norm0.eps, pone, p_x)
        if direct is not None:
            assert r is not None
            args = (r.tables.data_ptr(), r.tables.shape[1], r.row.data_ptr())
            tail = (r.hi.data_ptr(), r.first.data_ptr(), t, h_, kvh, hd, bs)
        n = len(layers)
        for i, layer in enumerate(layers):
            a, mlp, lp = layer.self_attn, layer.mlp, plan.layers[i]
            if a.window is None and md.trimmed:
                raise RuntimeError(
                    "a full-attention layer was given block tables trimmed to a sliding window: "
                    "blocks are freed only when every layer is windowed"
                )
            qkv = project(a.qkv, x).contiguous()
            if qkv.shape != (t, qkv_width):
                raise ValueError(
                    f"fused forward: layer {i}'s qkv gave {tuple(qkv.shape)}, not ({t}, {qkv_width})"
                )
            p_cos, p_sin, rd = p_tables[lp.table]
            if lp.qk_norm:
                qn, kn = a.q_norm, a.k_norm
                norm = (qn.weight.data_ptr(), kn.weight.data_ptr(), qn.eps, pone)
            else:
                norm = (None, None, 0.0, 0)
            kp = cache0 + i * layer_bytes
            if direct is not None:
                lib.rope_qkv_f32(
                    qkv.data_ptr(), t, h_, kvh, hd, rd, p_pos, p_cos, p_sin, *norm,
                    p_q, kp, kp + half_bytes, p_slots,
                )  # fmt: skip
                direct(
                    p_q, kp, kp + half_bytes, *args, r.lo[a.window].data_ptr(), *tail,
                    a.scale, a.softcap or 0.0, p_o, attention_native.PAR_MIN_WORK,
                )  # fmt: skip
                ao = o
            else:
                lib.rope_qkv_f32(
                    qkv.data_ptr(), t, h_, kvh, hd, rd, p_pos, p_cos, p_sin, *norm, p_q, None, None, None
                )
                k = qkv[:, h_ * hd : (h_ + kvh) * hd].view(t, kvh, hd)
                v = qkv[:, (h_ + kvh) * hd :].view(t, kvh, hd)
                ao = paged_attention(q, k, v, kv_caches[i], md, a.scale, a.window, a.softcap)
            out = project(a.o_proj, ao.view(t, h_ * hd)).contiguous()
            if lp.sandwich:  # res += post_attention_norm(out); x = pre_feedforward_norm(res)
                pn, ln = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
                pre = (pn.weight.data_ptr(), pn.eps)
            else:  # res += out; x = post_attention_norm(res)
                ln, pre = layer.post_attention_layernorm, (None, 0.0)
            lib.add_rmsnorm_f32(
                out.data_ptr(), *pre, p_res, ln.weight.data_ptr(), t, hidden, ln.eps, pone, p_x
            )
            gu = project(mlp.gate_up, x).contiguous()
            if gu.shape != (t, 2 * inter):
                raise ValueError(
                    f"fused forward: layer {i}'s gate_up gave {tuple(gu.shape)}, not ({t}, {2 * inter})"
                )
            lib.act_mul_f32(gu.data_ptr(), t, inter, lp.act, p_act)
            m = project(mlp.down_proj, act).contiguous()
            ln = layers[i + 1].input_layernorm if i + 1 < n else self.model.norm
            if lp.sandwich:  # res += post_feedforward_norm(m)
                pn = layer.post_feedforward_layernorm
                pre = (pn.weight.data_ptr(), pn.eps)
            else:
                pre = (None, 0.0)
            lib.add_rmsnorm_f32(m.data_ptr(), *pre, p_res, ln.weight.data_ptr(), t, hidden, ln.eps, pone, p_x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, kvh, hd]
        md: AttentionMetadata,
    ) -> torch.Tensor:
        if self.fused and input_ids.shape[0] <= fused_native.FUSED_MAX_ROWS:
            return self._fused_forward(input_ids, positions, kv_caches, md)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv_caches[i], md)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return project(self.lm_head, hidden).float()
