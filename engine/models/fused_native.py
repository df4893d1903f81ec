"""Fused native fp32 kernels for the small ops of a decoder layer at small batch (issue #17).

At decode a batch has a few rows, and each small op between the projections (RMSNorm's seven torch
ops, the residual add, RoPE's slices/cats/multiplies, SiLU times the up projection, the two
``index_copy_`` of the KV write) costs a few microseconds of dispatch for a few hundred bytes of
work: at batch 1 on SmolLM2-135M (30 layers) that overhead, not arithmetic, was most of the step
outside the projections. Three C functions replace them (compiled once per source, flags and CPU
by :func:`engine.native_build.build_library`, single-threaded: the rows are few):

* ``add_rmsnorm``: ``res += x`` (when ``x`` is given; ``res += norm(x)`` with a second weight for
  Gemma's post-attention/post-feedforward norms) then ``out = norm(res)``, the residual add and the
  next RMSNorm in one pass (HF's ``LlamaRMSNorm``, or with ``plus_one`` Gemma's ``(1 + w)`` one, in
  fp32);
* ``rope_qkv``: on a fused ``qkv`` projection output ``[T, (H + 2 KVH) * hd]``, normalises each q
  and k head when given q/k norm weights (Qwen3, Gemma 3: before RoPE), rotates the first ``R``
  dims of the q and k heads in place (HF's rotate-half convention; ``R < hd``: partial rotary,
  Phi-3; tables ``cos``/``sin`` ``[max_positions, R]`` indexed by each row's position), copies q
  out contiguous ``[T, H, hd]`` and writes k and v into the layer's paged cache at the rows' slots;
* ``act_mul``: ``out = act(gate) * up`` over a fused ``gate_up`` output ``[T, 2 I]``, ``act``
  SiLU or GELU-tanh (:class:`Act`).

Contract: float32, contiguous, CPU; positions in ``[0, max_positions)`` and slots in the cache;
the index data is trusted here, :func:`check_step` validates it once per step. Results differ from
the torch ops by rounding only (fp32 sums in another order, fused multiply-adds):
tests/unit/test_fused_native.py compares them.

Selection (:func:`engine.models.llama.LlamaForCausalLM.enable_fused`; which structures are
covered: :mod:`engine.models.fused_plan`): the same as the native linear's (``EngineConfig.linear``:
a float32 model on CPU whose projections took the native linear, or the native int8 linear under
``weight_dtype`` int8), and the kernel builds; otherwise the torch ops run. The model uses the
fused forward for batches of at most :data:`FUSED_MAX_ROWS` rows (larger prefill chunks keep
torch's vectorised ops).
"""

from __future__ import annotations

import ctypes
import enum

import torch

from engine.native_build import NativeLibrary

# rows up to which the model's forward takes the fused path (decode batches; the SiLU loop is scalar
# expf, slower than torch's vectorised one for prefill-sized batches)
FUSED_MAX_ROWS = 64


class Act(enum.IntEnum):
    """The gate activations :func:`act_mul` computes (the C kernel's ``act`` argument)."""

    SILU = 0  # x * sigmoid(x): HF "silu"/"swish"
    GELU_TANH = 1  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): "gelu_pytorch_tanh", "gelu_new"


_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* RMSNorm weight factor: w (Llama) or 1 + w (Gemma, "plus_one") */
static inline float wf(const float* w, int64_t d, int plus_one) { return plus_one ? 1.f + w[d] : w[d]; }

/* 1 / sqrt(mean(v^2) + eps) over n values */
static inline float inv_rms(const float* v, int64_t n, float eps)
{
    float ss = 0.f;
    for (int64_t d = 0; d < n; d++) ss += v[d] * v[d];
    return 1.f / sqrtf(ss / (float)n + eps);
}

/* res += x, or res += norm_xw(x) when xw is given (Gemma's post-norms; eps xeps);
   x may be NULL: norm of res alone. Then out = norm_w(res) with eps.
   norm_w(v) = (v * inv_rms(v)) * w  (w -> 1 + w when plus_one) */
void add_rmsnorm_f32(const float* x, const float* xw, float xeps, float* res, const float* w,
                     int64_t T, int64_t D, float eps, int plus_one, float* out)
{
    for (int64_t t = 0; t < T; t++) {
        float* r = res + t * D;
        float* o = out + t * D;
        if (x) {
            const float* xi = x + t * D;
            if (xw) {
                const float ix = inv_rms(xi, D, xeps);
                for (int64_t d = 0; d < D; d++) r[d] = r[d] + (xi[d] * ix) * wf(xw, d, plus_one);
            } else {
                for (int64_t d = 0; d < D; d++) r[d] = r[d] + xi[d];
            }
        }
        const float inv = inv_rms(r, D, eps);
        for (int64_t d = 0; d < D; d++) o[d] = (r[d] * inv) * wf(w, d, plus_one);
    }
}

/* qkv [T, (H + 2 KVH) * D]: each q head (k head) first normalised over its D values by qw (kw)
   when given (per-head q/k RMSNorm, eps; plus_one as above), then its first R dims rotated
   (rotate-half over R, tables [max_positions, R]); all in place; q -> q_out [T, H, D];
   k, v -> kc, vc [slots, KVH, D] at slots[t] (kc/vc NULL: no cache write) */
void rope_qkv_f32(float* qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t R,
                  const int64_t* pos, const float* cos_t, const float* sin_t,
                  const float* qw, const float* kw, float eps, int plus_one,
                  float* q_out, float* kc, float* vc, const int64_t* slots)
{
    const int64_t half = R / 2, width = (H + 2 * KVH) * D;
    for (int64_t t = 0; t < T; t++) {
        float* row = qkv + t * width;
        const float* c = cos_t + pos[t] * R;
        const float* s = sin_t + pos[t] * R;
        for (int64_t h = 0; h < H + KVH; h++) {
            float* x = row + h * D;
            const float* nw = h < H ? qw : kw;
            if (nw) {
                const float inv = inv_rms(x, D, eps);
                for (int64_t d = 0; d < D; d++) x[d] = (x[d] * inv) * wf(nw, d, plus_one);
            }
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

/* gu [T, 2I] (gate then up); out [T, I] = act(gate) * up; act 0 SiLU, 1 GELU (tanh form) */
void act_mul_f32(const float* gu, int64_t T, int64_t I, int act, float* out)
{
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;  /* sqrt(2 / pi) */
    for (int64_t t = 0; t < T; t++) {
        const float* g = gu + t * 2 * I;
        const float* u = g + I;
        float* o = out + t * I;
        if (act == 0) {
            for (int64_t i = 0; i < I; i++) { const float v = g[i]; o[i] = v / (1.f + expf(-v)) * u[i]; }
        } else {
            for (int64_t i = 0; i < I; i++) {
                const float v = g[i];
                o[i] = 0.5f * v * (1.f + tanhf(k0 * (v + k1 * v * v * v))) * u[i];
            }
        }
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    i32 = ctypes.c_int
    lib.add_rmsnorm_f32.argtypes = [p, p, f32, p, p, i64, i64, f32, i32, p]
    lib.add_rmsnorm_f32.restype = None
    lib.rope_qkv_f32.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, f32, i32, p, p, p, p]
    lib.rope_qkv_f32.restype = None
    lib.act_mul_f32.argtypes = [p, i64, i64, i32, p]
    lib.act_mul_f32.restype = None


_LIB = NativeLibrary("fused_small_ops", _SOURCE, _declare, "torch's small ops")


def kernel() -> ctypes.CDLL | None:
    """The built library, or None (then :func:`unavailable_reason` says why)."""
    return _LIB.get()


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on first call)."""
    return kernel() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` returned False (None when nothing failed)."""
    return _LIB.reason


def _lib_or_raise() -> ctypes.CDLL:
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"fused native kernels unavailable: {_LIB.reason}")
    return lib


def _check_f32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def add_rmsnorm(
    x: torch.Tensor | None,
    res: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    x_weight: torch.Tensor | None = None,
    x_eps: float | None = None,
    plus_one: bool = False,
) -> torch.Tensor:
    """``res += x`` in place (``x`` None: no add; ``x_weight`` given: ``res += norm(x)`` with
    that weight and ``x_eps``, Gemma's post-norms), then the RMSNorm of ``res`` with ``weight``:
    ``[T, D]`` rows; returns ``out`` (allocated when None). ``plus_one``: every weight ``w`` acts
    as ``1 + w`` (Gemma's RMSNorm)."""
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
    if x_weight is not None:
        if x is None:
            raise ValueError("add_rmsnorm: x_weight without x")
        _check_f32(x_weight=x_weight)
        if x_weight.shape != (d,):
            raise ValueError(f"add_rmsnorm: x_weight {tuple(x_weight.shape)} != ({d},)")
    lib.add_rmsnorm_f32(
        _ptr(x), _ptr(x_weight), float(eps if x_eps is None else x_eps), res.data_ptr(),
        weight.data_ptr(), t, d, float(eps), int(plus_one), out.data_ptr(),
    )  # fmt: skip
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
    *,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    plus_one: bool = False,
) -> torch.Tensor:
    """On ``qkv`` ``[T, (H + 2 KVH) * hd]`` in place: normalise each q head by ``q_weight`` and
    each k head by ``k_weight`` ``[hd]`` when given (per-head RMSNorm, ``norm_eps``; ``plus_one``
    as in :func:`add_rmsnorm`), then rotate the first ``R`` dims of every q and k head by the
    tables ``cos``/``sin`` ``[max_positions, R]`` (``R`` even, ``<= hd``; the rest passes
    through) at ``positions`` ``[T]``; write k and v into the layer's cache ``kv_cache``
    ``[2, num_blocks, block_size, KVH, hd]`` at ``slots`` when given; return q ``[T, H, hd]``
    (contiguous). Positions and slots are checked here (out of range: IndexError)."""
    lib = _lib_or_raise()
    t = qkv.shape[0]
    _check_f32(qkv=qkv, cos=cos, sin=sin)
    if qkv.shape != (t, (heads + 2 * kv_heads) * head_dim):
        raise ValueError(f"rope_qkv: qkv {tuple(qkv.shape)} is not [T, (H + 2 KVH) * hd]")
    rd = cos.shape[1] if cos.dim() == 2 else -1
    if cos.shape != sin.shape or cos.dim() != 2 or rd % 2 or not 0 < rd <= head_dim:
        raise ValueError(
            f"rope_qkv: tables {tuple(cos.shape)} must be [max_positions, R], R even <= {head_dim}"
        )
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            _check_f32(**{name: w})
            if w.shape != (head_dim,):
                raise ValueError(f"rope_qkv: {name} {tuple(w.shape)} != ({head_dim},)")
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
        qkv.data_ptr(), t, heads, kv_heads, head_dim, rd, positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), _ptr(q_weight), _ptr(k_weight), float(norm_eps),
        int(plus_one), q.data_ptr(), kp, vp, sp,
    )  # fmt: skip
    return q


def act_mul(gate_up: torch.Tensor, act: Act = Act.SILU, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` of a fused ``[T, 2 I]`` gate/up output: ``[T, I]``."""
    lib = _lib_or_raise()
    act = Act(act)
    _check_f32(gate_up=gate_up)
    t, i2 = gate_up.shape
    if i2 % 2:
        raise ValueError(f"act_mul: width {i2} is odd")
    if out is None:
        out = torch.empty(t, i2 // 2)
    _check_f32(out=out)
    if out.shape != (t, i2 // 2):
        raise ValueError(f"act_mul: out {tuple(out.shape)} != {(t, i2 // 2)}")
    lib.act_mul_f32(gate_up.data_ptr(), t, i2 // 2, int(act), out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[T, 2 I]`` gate/up output: ``[T, I]``."""
    return act_mul(gate_up, Act.SILU, out)


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
