"""Latency from Vidur's operator profiles (MLSys'24) plus first-principles attention.

Linear operators (norms, QKV/output projections, RoPE, MLP up/act/down, residual add) come from
``vidur/data/profiling/compute/<gpu>/<model>/mlp.csv`` (median ms per layer, by token count and
TP degree), interpolated linearly in the token count and extrapolated linearly past the table.
With TP > 1 each layer adds two all-reduces of ``tokens x hidden x 2`` bytes, interpolated from
``network/<gpu>_dgx/all_reduce.csv`` (intra-node NVLink, ``num_workers == devices_per_node == tp``).

Attention tables are not shipped, so attention is modelled from first principles, per layer and
GPU (``hq = heads/tp`` query heads, ``hkv = max(1, kv_heads/tp)`` KV heads, head dim ``d``)::

    prefill chunk (n new, c cached):  flops = 4*hq*d*n*(c + n/2)     bytes = 4*hkv*d*(c + n)
    decode (batch, sum of contexts C): flops = 4*hq*d*C              bytes = 4*hkv*d*C
    time = overhead + max(flops / (peak_flops * EFF_COMPUTE), bytes / (mem_bw * EFF_MEMORY))

(causal masking halves the new-token square; bytes are fp16 K and V read once). Constants:
``EFF_COMPUTE = 0.30``, ``EFF_MEMORY = 0.84``, ``OVERHEAD_S = 20 us`` per layer and phase; they
were chosen by a grid fit against Vidur's legacy A100 attention table (``legacy_2024-05``,
Llama-2-70B shapes at TP2), where they give a median |log error| of 0.18 (prefill) and 0.08
(decode); peaks are in :mod:`simulator.hardware`. The LM head is first-principles too (one
logits row per sequence in the step). Each step adds ``cpu_overhead_s`` (default 0.5 ms) for
scheduling, input preparation and sampling, which Vidur profiles separately and we do not have.
Pipeline parallelism is not modelled.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.data import data_path
from simulator.hardware import GpuKind, GpuSpec, gpu_spec
from simulator.latency.base import LatencyModel
from simulator.models import ModelSpec, model_spec

EFF_COMPUTE = 0.30
EFF_MEMORY = 0.84
OVERHEAD_S = 20e-6
_LINEAR_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
_TABLE_CAP = 16384  # token counts precomputed into a lookup list


def _median(row: dict[str, str], op: str) -> float:
    return float(row[f"time_stats.{op}.median"])


def load_mlp_table(gpu: GpuKind, model: ModelSpec, tp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token counts, per-layer linear-op seconds, embedding seconds) for ``tp``, sorted by tokens."""
    if model.vidur_id is None:
        raise ValueError(f"no Vidur profile for {model.name}")
    path = data_path(
        "vidur", "data", "profiling", "compute", gpu.value, *model.vidur_id.split("/"), "mlp.csv"
    )
    toks, lin, emb = [], [], []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) != tp:
                continue
            toks.append(int(row["num_tokens"]))
            lin.append(sum(_median(row, op) for op in _LINEAR_OPS) * 1e-3)
            emb.append(_median(row, "emb") * 1e-3)
    if not toks:
        raise ValueError(f"Vidur has no TP{tp} profile for {model.name} on {gpu.value}")
    order = np.argsort(toks)
    return np.asarray(toks, float)[order], np.asarray(lin)[order], np.asarray(emb)[order]


def load_all_reduce(gpu: GpuSpec, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """(message bytes, seconds) of an intra-node all-reduce over ``tp`` GPUs."""
    path = data_path("vidur", "data", "profiling", "network", gpu.vidur_network, "all_reduce.csv")
    size, secs = [], []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_workers"]) == tp and int(row["devices_per_node"]) == tp:
                size.append(int(row["size"]))
                secs.append(float(row["time_stats.all_reduce.median"]) * 1e-3)
    if not size:
        raise ValueError(f"no all_reduce profile for TP{tp} in {gpu.vidur_network}")
    order = np.argsort(size)
    return np.asarray(size, float)[order], np.asarray(secs)[order]


def _interp_extrap(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Linear interpolation; linear extrapolation past the last point (slope of the last quarter)."""
    out = np.interp(x, xs, ys)
    k = max(2, len(xs) // 4)
    slope = (ys[-1] - ys[-k]) / max(xs[-1] - xs[-k], 1e-12)
    hi = x > xs[-1]
    out[hi] = ys[-1] + slope * (x[hi] - xs[-1])
    return out


@dataclass(frozen=True)
class AttentionModel:
    """First-principles attention time of one layer on one GPU (see the module docstring)."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1

    @property
    def flop_s(self) -> float:
        """Seconds per unit of ``n * (ctx + n/2)`` (prefill) or of context (decode)."""
        hq = self.model.num_heads / self.tp
        return 4 * hq * self.model.head_dim / (self.gpu.peak_flops * EFF_COMPUTE)

    @property
    def byte_s(self) -> float:
        """Seconds per token of K+V read."""
        hkv = max(1.0, self.model.num_kv_heads / self.tp)
        return 4 * hkv * self.model.head_dim / (self.gpu.mem_bandwidth * EFF_MEMORY)

    def prefill(self, chunks: Sequence[tuple[int, int]]) -> float:
        """One layer, a batch of prefill chunks ``(new tokens, cached context)``."""
        if not chunks:
            return 0.0
        f, b = self.flop_s, self.byte_s
        return OVERHEAD_S + sum(max(f * n * (c + 0.5 * n), b * (c + n)) for n, c in chunks)

    def decode(self, batch: int, total_context: int) -> float:
        """One layer, ``batch`` decodes reading ``total_context`` KV tokens in all."""
        if not batch:
            return 0.0
        return OVERHEAD_S + max(self.flop_s, self.byte_s) * total_context


class VidurLatencyModel(LatencyModel):
    """Step time = layers x (linear ops + all-reduces + attention) + embedding + LM head + CPU."""

    def __init__(
        self,
        model: str | ModelSpec,
        gpu: GpuKind | str,
        tp: int = 1,
        *,
        cpu_overhead_s: float = 5e-4,
        **kw,
    ) -> None:
        self.model = model if isinstance(model, ModelSpec) else model_spec(model)
        self.gpu = gpu_spec(gpu)
        if not self.model.valid_tp(tp):
            raise ValueError(f"TP{tp} does not divide {self.model.name}'s heads")
        super().__init__(kv_bytes_per_token=self.model.kv_bytes_per_token, **kw)
        self.tp = tp
        self.cpu_overhead_s = cpu_overhead_s
        m = self.model
        toks, lin, emb = load_mlp_table(self.gpu.kind, m, tp)
        n = np.arange(_TABLE_CAP + 1, dtype=float)
        per_layer = _interp_extrap(n, toks, lin)
        if tp > 1:
            sizes, secs = load_all_reduce(self.gpu, tp)
            per_layer = per_layer + 2 * _interp_extrap(n * m.hidden * m.dtype_bytes, sizes, secs)
        total = m.num_layers * per_layer + _interp_extrap(n, toks, emb)
        total[0] = 0.0
        self._linear: list[float] = total.tolist()
        self._lin_slope = (total[-1] - total[-1025]) / 1024
        self.attention = AttentionModel(m, self.gpu, tp)
        L = m.num_layers
        # AttentionModel's per-layer coefficients summed over layers, inlined in step_time.
        self._att_c = L * self.attention.flop_s
        self._att_m = L * self.attention.byte_s
        self._att_oh = L * OVERHEAD_S
        vocab_bytes = m.hidden * m.vocab_size * m.dtype_bytes / tp
        self._head_m = vocab_bytes / (self.gpu.mem_bandwidth * EFF_MEMORY)
        self._head_c = 2 * m.hidden * m.vocab_size / tp / (self.gpu.peak_flops * EFF_COMPUTE)

    def linear_time(self, num_tokens: int) -> float:
        """Seconds of all non-attention operators for a step of ``num_tokens`` tokens."""
        if num_tokens <= _TABLE_CAP:
            return self._linear[num_tokens]
        return self._linear[_TABLE_CAP] + self._lin_slope * (num_tokens - _TABLE_CAP)

    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        tokens = num_decodes
        att = 0.0
        if prefill_tokens:
            c, mem = self._att_c, self._att_m
            work = 0.0
            for n, ctx in zip(prefill_tokens, prefill_contexts, strict=True):
                tokens += n
                fl = c * n * (ctx + 0.5 * n)
                by = mem * (ctx + n)
                work += fl if fl > by else by
            att += self._att_oh + work
        if num_decodes:
            fl = self._att_c * decode_context
            by = self._att_m * decode_context
            att += self._att_oh + (fl if fl > by else by)
        if tokens == 0:
            return 0.0
        seqs = len(prefill_tokens) + num_decodes
        head = max(self._head_m, self._head_c * seqs)
        return self.cpu_overhead_s + self.linear_time(tokens) + att + head
