"""A native fp32 "skinny" linear for small CPU batches (issue #17): ``y = x @ w.T (+ b)``.

At decode the batch has a few rows and a projection is a matrix-vector product: its cost is
reading the weight once. :func:`skinny_linear` streams each fp32 weight row once (AVX2/FMA, or
whatever ``-march=native`` vectorises the portable loop to), in tiles of 4 weight rows x up to 3
activation rows held in registers, split over OpenMP threads (torch's pool, see
:mod:`engine.native_build`) by output rows. Larger batches call ``F.linear`` (BLAS GEMM).

:class:`LinearBackend` names the choice (``EngineConfig(linear=...)``, env ``PDSERVE_LINEAR``):

* ``torch``: every projection is ``nn.Linear`` (``F.linear``);
* ``native``: the decoder's projections (fused ``qkv``, ``o_proj``, fused ``gate_up``,
  ``down_proj``) and the ``lm_head`` become :class:`NativeLinear` (the same parameters, no copy):
  up to :data:`NATIVE_MAX_ROWS` rows the kernel, more rows, a non-fp32 or non-CPU input, or no C
  compiler: ``F.linear``;
* ``auto``: ``native`` where :func:`resolve_linear` allows it (float32 model on CPU, not
  mixture-of-experts, the kernel builds), else ``torch``.

An engine takes ``EngineConfig.linear``, or when that is None env ``PDSERVE_LINEAR``, else
``torch`` (:func:`engine_linear`); ``load_model`` defaults to ``torch``.

``native`` asked for explicitly on a model it does not apply to (CUDA, non-fp32, MoE) is refused
with :class:`UnsupportedLinearError` naming why. The caller (engine.llm_engine) keeps ``torch``
for tensor parallelism, LoRA and weight offloading. fp32 sums in another order than BLAS: results
differ from ``F.linear`` by rounding only (tests/unit/test_linear_native.py).
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.native_build import NativeBuildError, build_library

log = logging.getLogger(__name__)

# rows up to which the kernel beats F.linear on SmolLM2's shapes (bench/linear_skinny.py)
NATIVE_MAX_ROWS = 16


class UnsupportedLinearError(ValueError):
    """A ``linear`` backend this engine does not implement for this model/device (message says why)."""


class LinearBackend(enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    NATIVE = "native"

    @staticmethod
    def parse(name: str | LinearBackend) -> LinearBackend:
        """The member named ``name``; UnsupportedLinearError naming the choices otherwise."""
        if isinstance(name, LinearBackend):
            return name
        try:
            return LinearBackend(name)
        except ValueError:
            choices = ", ".join(m.value for m in LinearBackend)
            raise UnsupportedLinearError(f"linear must be one of {choices}; got {name!r}") from None


_SOURCE = r"""
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[m, n0 + j] for m < MB (x rows from x), j < NB (w rows from w); MB <= 3, NB <= 4 constant */
static inline __attribute__((always_inline)) void tile(
    const float* restrict x, int64_t K, const float* restrict w, const int MB, const int NB,
    const float* restrict bias, int64_t n0, float* restrict out, int64_t N)
{
    __m256 acc[3][4];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[3];
        for (int i = 0; i < MB; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
        for (int j = 0; j < NB; j++) {
            const __m256 wv = _mm256_loadu_ps(w + j * K + k);
            for (int i = 0; i < MB; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum8(acc[i][j]);
            for (int64_t kk = k; kk < K; kk++) s += x[i * K + kk] * w[j * K + kk];
            out[i * N + n0 + j] = s + (bias ? bias[n0 + j] : 0.f);
        }
}
#else
static inline __attribute__((always_inline)) void tile(
    const float* restrict x, int64_t K, const float* restrict w, const int MB, const int NB,
    const float* restrict bias, int64_t n0, float* restrict out, int64_t N)
{
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += x[i * K + k] * w[j * K + k];
            out[i * N + n0 + j] = s + (bias ? bias[n0 + j] : 0.f);
        }
}
#endif

#define ROWS(NB)                                                                             \
    for (int64_t m0 = 0; m0 < M; m0 += 3) {                                                  \
        const float* xm = x + m0 * K;                                                        \
        float* om = out + m0 * N;                                                            \
        switch (M - m0 >= 3 ? 3 : M - m0) {                                                  \
        case 3: tile(xm, K, wn, 3, NB, bias, n0, om, N); break;                               \
        case 2: tile(xm, K, wn, 2, NB, bias, n0, om, N); break;                               \
        default: tile(xm, K, wn, 1, NB, bias, n0, om, N); break;                              \
        }                                                                                    \
    }

/* out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); x [M, K], w [N, K], out [M, N], all f32 */
void f32_linear(const float* x, int64_t M, int64_t K, const float* w, const float* bias, int64_t N,
                float* out)
{
    const int64_t nblk = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t n0 = b * 4;
        const float* wn = w + n0 * K;
        if (N - n0 >= 4) {
            ROWS(4)
        } else {
            for (int64_t r = n0; r < N; r++) {
                const int64_t n0 = r;
                const float* wn = w + r * K;
                ROWS(1)
            }
        }
    }
}
"""

_lib: ctypes.CDLL | None = None
_lib_reason: str | None = None


def kernel() -> ctypes.CDLL | None:
    """The built kernel library, or None (then :func:`kernel_unavailable_reason` says why)."""
    global _lib, _lib_reason
    if _lib is not None or _lib_reason is not None:
        return _lib
    try:
        lib = build_library("f32_linear", _SOURCE)
    except (OSError, NativeBuildError) as e:
        _lib_reason = str(e)
        log.info("fp32 linear kernel unavailable (%s): F.linear for every batch", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.f32_linear.argtypes = [p, i64, i64, p, p, i64, p]
    lib.f32_linear.restype = None
    _lib = lib
    return lib


def kernel_unavailable_reason() -> str | None:
    """Why :func:`kernel` returned None (None while it is available or not yet tried)."""
    return _lib_reason


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the native kernel, any number of rows: ``x [..., K]``,
    ``weight [N, K]``, ``bias [N]``, all fp32 on CPU (ValueError otherwise, or RuntimeError
    when the kernel cannot be built)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"fp32 linear kernel unavailable: {_lib_reason}")
    tensors = [x, weight] + ([] if bias is None else [bias])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("skinny_linear takes float32 CPU tensors")
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias mismatch")
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m:
        lib.f32_linear(
            x2.data_ptr(), m, k, w.data_ptr(), None if b is None else b.data_ptr(), n, out.data_ptr()
        )
    return out.view(*x.shape[:-1], n)


class NativeLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state) whose forward takes :func:`skinny_linear` for
    fp32 CPU inputs of at most :data:`NATIVE_MAX_ROWS` rows with an fp32 CPU weight, and
    ``F.linear`` for everything else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.dtype == torch.float32
            and w.dtype == torch.float32
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and x.numel() <= NATIVE_MAX_ROWS * self.in_features
            and not torch.is_grad_enabled()
            and _lib is not None
        ):
            return skinny_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def engine_linear(linear: str | None, lora: bool = False, offload: bool = False) -> LinearBackend:
    """The backend an engine asks :func:`engine.models.loader.load_model` for: ``linear``
    (``EngineConfig.linear``), or if None env ``PDSERVE_LINEAR``, else ``torch``. With LoRA
    adapters or weight offloading: ``torch`` (``native`` asked for: UnsupportedLinearError)."""
    lb = LinearBackend.parse(linear if linear is not None else os.environ.get("PDSERVE_LINEAR", "torch"))
    if lora or offload:
        if linear is not None and lb is LinearBackend.NATIVE:
            what = "LoRA adapters" if lora else "weight offloading"
            raise UnsupportedLinearError(f"linear 'native' is refused with {what}; use linear='torch'")
        return LinearBackend.TORCH
    return lb


def resolve_linear(
    linear: str | LinearBackend, cfg: object, dtype: torch.dtype, device: torch.device
) -> LinearBackend:
    """``TORCH`` or ``NATIVE`` for a model of config ``cfg`` in ``dtype`` on ``device``.
    ``AUTO``: ``NATIVE`` where it applies and the kernel builds, else ``TORCH``. ``NATIVE`` where
    it does not apply: UnsupportedLinearError naming why."""
    lb = LinearBackend.parse(linear)
    if lb is LinearBackend.TORCH:
        return lb
    why = None
    if device.type != "cpu" or dtype != torch.float32:
        why = f"it needs a float32 model on CPU, got {dtype} on {device.type}"
    elif getattr(cfg, "moe", None) is not None:
        why = f"mixture-of-experts models ({getattr(cfg, 'model_type', '?')}) keep torch's linear"
    if why is None and kernel() is None:
        why = f"the kernel cannot be built ({_lib_reason})"
    if why is None:
        return LinearBackend.NATIVE
    if lb is LinearBackend.NATIVE:
        raise UnsupportedLinearError(f"linear 'native' is refused: {why}; use linear='torch'")
    return LinearBackend.TORCH


def apply_native_linear(model: nn.Module) -> nn.Module:
    """Turn the decoder's ``nn.Linear`` projections and the ``lm_head`` of a loaded model into
    :class:`NativeLinear` in place (the same parameter tensors; tied weights stay tied)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child in parent.children():
                if type(child) is nn.Linear:
                    child.__class__ = NativeLinear
    if type(model.lm_head) is nn.Linear:
        model.lm_head.__class__ = NativeLinear
    return model
