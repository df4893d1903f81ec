"""Fused native fp32 kernels for the small ops of a decoder layer at small batch (issue #17).

At decode a batch has a few rows, and each small op between the projections (RMSNorm's seven torch
ops, the residual add, RoPE's slices/cats/multiplies, SiLU times the up projection, the two
``index_copy_`` of the KV write) costs a few microseconds of dispatch for a few hundred bytes of
work: at batch 1 on SmolLM2-135M (30 layers) that overhead, not arithmetic, was most of the step
outside the projections. Three C functions replace them (compiled once per source, flags and CPU
by :func:`engine.native_build.build_library`, single-threaded: the rows are few):

* ``add_rmsnorm``: ``res += x`` (when ``x`` is given) then ``out = w * (res * rsqrt(mean(res**2) +
  eps))``, the residual add and the next RMSNorm in one pass (HF's ``LlamaRMSNorm`` in fp32);
* ``rope_qkv``: on a fused ``qkv`` projection output ``[T, (H + 2 KVH) * hd]``, rotates the q and k
  heads in place (HF's rotate-half convention, full rotary dim, tables ``cos``/``sin``
  ``[max_positions, hd]`` indexed by each row's position), copies q out contiguous ``[T, H, hd]``
  and writes k and v into the layer's paged cache at the rows' slots;
* ``silu_mul``: ``out = silu(gate) * up`` over a fused ``gate_up`` output ``[T, 2 I]``.

Contract: float32, contiguous, CPU; positions in ``[0, max_positions)`` and slots in the cache;
the index data is trusted here, :func:`check_step` validates it once per step. Results differ from
the torch ops by rounding only (fp32 sums in another order, fused multiply-adds):
tests/unit/test_fused_native.py compares them.

Selection (:func:`engine.models.llama.LlamaForCausalLM.enable_fused`): the same as the native
linear's (``EngineConfig.linear``: a float32 model on CPU whose projections took the native linear),
and the kernel builds; otherwise the torch ops run. The model uses the fused forward for batches of
at most :data:`FUSED_MAX_ROWS` rows (prefill chunks keep torch's vectorised ops).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from engine.native_build import NativeBuildError, build_library

log = logging.getLogger(__name__)

# rows up to which the model's forward takes the fused path (decode batches; the SiLU loop is scalar
# expf, slower than torch's vectorised one for prefill-sized batches)
FUSED_MAX_ROWS = 64

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* res += x (x may be NULL: norm of res alone); out = w * (res * 1/sqrt(mean(res^2) + eps)) */
void add_rmsnorm_f32(const float* x, float* res, const float* w, int64_t T, int64_t D, float eps,
                     float* out)
{
    for (int64_t t = 0; t < T; t++) {
        float* r = res + t * D;
        float* o = out + t * D;
        float ss = 0.f;
        if (x) {
            const float* xi = x + t * D;
            for (int64_t d = 0; d < D; d++) { float v = r[d] + xi[d]; r[d] = v; ss += v * v; }
        } else {
            for (int64_t d = 0; d < D; d++) ss += r[d] * r[d];
        }
        const float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (r[d] * inv);
    }
}

/* qkv [T, (H + 2 KVH) * D]: rotate q and k heads in place; q -> q_out [T, H, D];
   k, v -> kc, vc [slots, KVH, D] at slots[t] (kc/vc NULL: no cache write) */
void rope_qkv_f32(float* qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, const int64_t* pos,
                  const float* cos_t, const float* sin_t, float* q_out, float* kc, float* vc,
                  const int64_t* slots)
{
    const int64_t half = D / 2, width = (H + 2 * KVH) * D;
    for (int64_t t = 0; t < T; t++) {
        float* row = qkv + t * width;
        const float* c = cos_t + pos[t] * D;
        const float* s = sin_t + pos[t] * D;
        for (int64_t h = 0; h < H + KVH; h++) {
            float* x = row + h * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[i];
                x[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
        memcpy(q_out + t * H * D, row, (size_t)(H * D) * sizeof(float));
        if (kc) {
            memcpy(kc + slots[t] * KVH * D, row + H * D, (size_t)(KVH * D) * sizeof(float));
            memcpy(vc + slots[t] * KVH * D, row + (H + KVH) * D, (size_t)(KVH * D) * sizeof(float));
        }
    }
}

/* gu [T, 2I] (gate then up); out [T, I] = silu(gate) * up */
void silu_mul_f32(const float* gu, int64_t T, int64_t I, float* out)
{
    for (int64_t t = 0; t < T; t++) {
        const float* g = gu + t * 2 * I;
        const float* u = g + I;
        float* o = out + t * I;
        for (int64_t i = 0; i < I; i++) { const float v = g[i]; o[i] = v / (1.f + expf(-v)) * u[i]; }
    }
}
"""

_lib: ctypes.CDLL | None = None
_reason: str | None = None


def kernel() -> ctypes.CDLL | None:
    """The built library, or None (then :func:`unavailable_reason` says why)."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    try:
        lib = build_library("fused_small_ops", _SOURCE)
    except (OSError, NativeBuildError) as e:
        _reason = str(e)
        log.info("fused native kernels unavailable (%s): torch's small ops", e)
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.add_rmsnorm_f32.argtypes = [p, p, p, i64, i64, f32, p]
    lib.add_rmsnorm_f32.restype = None
    lib.rope_qkv_f32.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p, p]
    lib.rope_qkv_f32.restype = None
    lib.silu_mul_f32.argtypes = [p, i64, i64, p]
    lib.silu_mul_f32.restype = None
    _lib = lib
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on first call)."""
    return kernel() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` returned False (None when nothing failed)."""
    return _reason


def _lib_or_raise() -> ctypes.CDLL:
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"fused native kernels unavailable: {_reason}")
    return lib


def _check_f32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")


def add_rmsnorm(
    x: torch.Tensor | None,
    res: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``res += x`` in place (``x`` None: no add), then the RMSNorm of ``res`` with ``weight``:
    ``[T, D]`` rows; returns ``out`` (allocated when None)."""
    lib = _lib_or_raise()
    t, d = res.shape
    if out is None:
        out = torch.empty_like(res)
    _check_f32(res=res, weight=weight, out=out)
    if weight.shape != (d,) or out.shape != res.shape:
        raise ValueError(f"add_rmsnorm: res {tuple(res.shape)}, weight {tuple(weight.shape)}, out mismatch")
    if x is not None:
        _check_f32(x=x)
        if x.shape != res.shape:
            raise ValueError(f"add_rmsnorm: x {tuple(x.shape)} != res {tuple(res.shape)}")
    lib.add_rmsnorm_f32(
        None if x is None else x.data_ptr(),
        res.data_ptr(),
        weight.data_ptr(),
        t,
        d,
        float(eps),
        out.data_ptr(),
    )
    return out


def rope_qkv(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate the q and k heads of ``qkv`` ``[T, (H + 2 KVH) * hd]`` in place by the tables
    ``cos``/``sin`` ``[max_positions, hd]`` at ``positions`` ``[T]``; write k and v into the
    layer's cache ``kv_cache`` ``[2, num_blocks, block_size, KVH, hd]`` at ``slots`` when given;
    return q ``[T, H, hd]`` (contiguous). Positions and slots are checked here (out of range:
    IndexError)."""
    lib = _lib_or_raise()
    t = qkv.shape[0]
    _check_f32(qkv=qkv, cos=cos, sin=sin)
    if qkv.shape != (t, (heads + 2 * kv_heads) * head_dim) or head_dim % 2:
        raise ValueError(f"rope_qkv: qkv {tuple(qkv.shape)} is not [T, (H + 2 KVH) * hd] with even hd")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"rope_qkv: tables {tuple(cos.shape)} must be [max_positions, {head_dim}]")
    check_index("positions", positions, t, cos.shape[0])
    kp = vp = sp = None
    if kv_cache is not None:
        if slots is None:
            raise ValueError("rope_qkv: kv_cache needs slots")
        _check_f32(kv_cache=kv_cache)
        nb, bs, kvh, hd = kv_cache.shape[1:]
        if (kvh, hd) != (kv_heads, head_dim):
            raise ValueError(f"rope_qkv: cache {tuple(kv_cache.shape)} does not hold {kv_heads} x {head_dim}")
        check_index("slots", slots, t, nb * bs)
        kp, vp, sp = kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), slots.data_ptr()
    q = torch.empty(t, heads, head_dim)
    lib.rope_qkv_f32(
        qkv.data_ptr(), t, heads, kv_heads, head_dim, positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), q.data_ptr(), kp, vp, sp,
    )  # fmt: skip
    return q


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[T, 2 I]`` gate/up output: ``[T, I]``."""
    lib = _lib_or_raise()
    _check_f32(gate_up=gate_up)
    t, i2 = gate_up.shape
    if i2 % 2:
        raise ValueError(f"silu_mul: width {i2} is odd")
    if out is None:
        out = torch.empty(t, i2 // 2)
    _check_f32(out=out)
    if out.shape != (t, i2 // 2):
        raise ValueError(f"silu_mul: out {tuple(out.shape)} != {(t, i2 // 2)}")
    lib.silu_mul_f32(gate_up.data_ptr(), t, i2 // 2, out.data_ptr())
    return out


def check_index(name: str, idx: torch.Tensor, rows: int, bound: int) -> None:
    """Refuse an index tensor the kernels would read or write out of bounds with: ``idx`` must be
    a contiguous int64 CPU tensor of ``rows`` entries in ``[0, bound)`` (IndexError otherwise)."""
    if (
        idx.dtype != torch.int64
        or idx.device.type != "cpu"
        or not idx.is_contiguous()
        or idx.shape != (rows,)
    ):
        raise ValueError(f"{name} must be a contiguous int64 CPU tensor of shape ({rows},)")
    if rows and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise IndexError(f"{name} out of range [0, {bound}): {idx.tolist()[:8]}")
