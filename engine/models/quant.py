"""Weight-only quantisation of a loaded model's projections (issue #17).

:class:`WeightDType` names what the engine accepts for ``weight_dtype``:

* ``float32`` / ``model`` (default): the weights stay in the model's dtype;
* ``int8``: every projection of the decoder (fused ``qkv``, ``o_proj``, fused ``gate_up``,
  ``down_proj``) and the ``lm_head`` become :class:`Int8Linear`: symmetric per-output-channel int8
  weights (``scale = max|w_row| / 127``), activations stay fp32. Batches of up to
  :data:`SKINNY_MAX_ROWS` rows use a native kernel that reads each int8 weight once and
  dequantises it in registers (the decode path); larger batches dequantise the whole weight into
  a reused fp32 buffer and call the BLAS GEMM (prefill is compute-bound). The embedding table is
  not quantised (a lookup reads a few rows). Accuracy on SmolLM2 is stated in the README and
  asserted by tests/unit/test_quant.py;
* ``bfloat16``: the same projections become :class:`BF16Linear`: weight and bias stored as
  ``torch.bfloat16`` (round-to-nearest-even from fp32; half the bytes). Forward is
  ``F.linear(x.to(bf16), w, b).to(x.dtype)``: the fp32 activations are rounded to bf16 at each
  projection's input, the GEMM (oneDNN's bf16 kernel on a CPU with ``avx512_bf16``/``amx_bf16``,
  on a weight pre-packed for it where that runs: bitwise the same as ``F.linear``) accumulates in
  fp32, and its output is rounded to bf16 before being widened back to fp32; the
  rest of the model (norms, RoPE, attention, residual stream, KV cache, logits softmax) stays
  fp32. The embedding table is not converted (with tied embeddings the ``lm_head`` gets its own
  bf16 copy). Refused on a CPU without native bf16 arithmetic (``avx512_bf16`` / ``amx_bf16`` in
  /proc/cpuinfo; torch then emulates it and is slower than fp32). Neither the native fp32 linear
  nor the fused native forward takes a :class:`BF16Linear` (both need fp32 or int8 projections;
  the runner logs why the fused path is off). Accuracy on SmolLM2 is stated in the README and
  asserted by tests/unit/test_quant_bf16.py.

Refused with :class:`UnsupportedWeightDTypeError` (naming the value and why): unknown names,
``int8``/``bfloat16`` on a mixture-of-experts model (its experts are stacked tensors, not
projections), on a non-fp32 model, or on CUDA. The native kernel is built like the attention kernel
(:mod:`engine.native_build`); without a C compiler every batch takes the dequantising path.
"""

from __future__ import annotations

import ctypes
import enum
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.native_build import NativeLibrary

SKINNY_MAX_ROWS = 16  # rows up to which the int8 kernel beats dequantise + GEMM on this class of CPU


class UnsupportedWeightDTypeError(ValueError):
    """A ``weight_dtype`` this engine does not implement for this model/device (message says why)."""


class WeightDType(enum.Enum):
    FLOAT32 = "float32"
    INT8 = "int8"
    BFLOAT16 = "bfloat16"

    @staticmethod
    def parse(name: str | WeightDType) -> WeightDType:
        """The member named ``name``; UnsupportedWeightDTypeError naming the choices otherwise."""
        if isinstance(name, WeightDType):
            return name
        try:
            return WeightDType(name)
        except ValueError:
            choices = ", ".join(m.value for m in WeightDType)
            raise UnsupportedWeightDTypeError(
                f"weight_dtype must be one of {choices}; got {name!r}"
            ) from None


_SOURCE = r"""
#include <stdint.h>

/* out[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]); x [M, K] f32, w [N, K] int8 */
void int8_linear_f32(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                     const float* bias, int64_t N, float* out)
{
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        float wf[K];
        const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
        for (int64_t n = n0; n < n1; n++) {
            const int8_t* wr = w + n * K;
            for (int64_t k = 0; k < K; k++) wf[k] = (float)wr[k];
            const float s = scale[n], b = bias ? bias[n] : 0.f;
            for (int64_t m = 0; m < M; m++) {
                const float* xr = x + m * K;
                float acc = 0.f;
                for (int64_t k = 0; k < K; k++) acc += xr[k] * wf[k];
                out[m * N + n] = acc * s + b;
            }
        }
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.int8_linear_f32.argtypes = [p, i64, i64, p, p, p, i64, p]
    lib.int8_linear_f32.restype = None


def _switched_off() -> str | None:
    return "PDSERVE_INT8_KERNEL=off" if os.environ.get("PDSERVE_INT8_KERNEL", "") == "off" else None


_LIB = NativeLibrary("int8_linear", _SOURCE, _declare, "dequantising every batch", disabled=_switched_off)


def _kernel() -> ctypes.CDLL | None:
    return _LIB.get()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [N, K] int8, scale [N] fp32)`` with ``w ~= q * scale[:, None]``
    (an all-zero row gets scale 1)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """``nn.Linear``'s interface (``in_features``, ``out_features``, ``weight``, ``bias``,
    ``forward``) over int8 weights with per-output-channel scales. ``weight`` is the int8 tensor
    ``[out, in]``; :meth:`dequantized` gives the fp32 weight it stands for."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._buf: torch.Tensor | None = None  # reused fp32 weight of the dequantising path

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            raise TypeError(f"Int8Linear takes float32 activations, got {x2.dtype}")
        m = x2.shape[0]
        lib = _kernel() if m <= SKINNY_MAX_ROWS and x2.device.type == "cpu" else None
        if lib is not None:
            x2 = x2.contiguous()
            out = torch.empty(m, self.out_features, dtype=torch.float32)
            b = self.bias
            lib.int8_linear_f32(
                x2.data_ptr(), m, self.in_features, self.weight.data_ptr(), self.scale.data_ptr(),
                None if b is None else b.data_ptr(), self.out_features, out.data_ptr(),
            )  # fmt: skip
        else:
            if self._buf is None:
                self._buf = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
            torch.mul(self.weight, self.scale[:, None], out=self._buf)
            out = F.linear(x2, self._buf, self.bias)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _bf16_pack_unavailable() -> str | None:
    """Why oneDNN's pre-packed bf16 linear (``torch.ops.mkldnn._reorder_linear_weight`` +
    ``_linear_pointwise``) cannot serve here (None: it can); probed once, on a small case that
    must equal ``F.linear`` in bf16 exactly."""
    global _PACK_REASON
    if _PACK_REASON is None:
        why = ""
        ops = torch.ops.mkldnn
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            why = "torch's oneDNN (mkldnn) is unavailable or disabled"
        elif not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
            why = "torch.ops.mkldnn lacks _reorder_linear_weight/_linear_pointwise"
        else:
            g = torch.Generator().manual_seed(0)
            w, b, x = (torch.randn(*s, generator=g).bfloat16() for s in ((40, 24), (40,), (3, 24)))
            try:
                with torch.inference_mode():
                    y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, 1), b, "none", [], "")
                if not torch.equal(y, F.linear(x, w, b)):
                    why = "the packed bf16 linear differs from F.linear on a probe"
            except RuntimeError as e:
                why = f"the packed bf16 linear fails here ({e})"
        _PACK_REASON = why
    return _PACK_REASON or None


_PACK_REASON: str | None = None


class BF16Linear(nn.Module):
    """``nn.Linear``'s interface over bf16 weights. ``forward`` takes float32 activations and
    returns float32: ``F.linear(x.to(bf16), weight, bias).to(x.dtype)`` (input rounded to bf16,
    fp32 accumulation, output rounded to bf16, see the module docstring).

    Where oneDNN's pre-packed linear runs (:func:`_bf16_pack_unavailable`), the weight is kept
    only in oneDNN's packed layout (an opaque bf16 tensor, same bytes) and the product is
    ``torch.ops.mkldnn._linear_pointwise``: bitwise equal to ``F.linear`` in bf16 (the probe and
    tests/unit/test_quant_bf16.py check it), and faster at decode sizes on this host, where
    torch's bf16 ``F.linear`` of one row took a slow path for some shapes (3072x576: ~4 ms vs
    ~0.1 ms fp32, measured 2026-12-06 on a loaded host). Elsewhere the plain bf16 tensor and
    ``F.linear``. ``weight`` is the plain ``[out, in]`` bf16 tensor either way (unpacked on
    access when packed)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).contiguous())
        self._packed: torch.Tensor | None = None
        if w.device.type == "cpu" and _bf16_pack_unavailable() is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            self.register_buffer("_weight", None)
        else:
            self.register_buffer("_weight", w)

    @property
    def weight(self) -> torch.Tensor:
        return self._packed.to_dense() if self._packed is not None else self._weight

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> BF16Linear:
        return cls(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"BF16Linear takes float32 activations, got {x.dtype}")
        xb = x.to(torch.bfloat16)
        if self._packed is None:
            return F.linear(xb, self._weight, self.bias).to(x.dtype)
        out = torch.ops.mkldnn._linear_pointwise(
            xb.reshape(-1, self.in_features), self._packed, self.bias, "none", [], ""
        )
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        packed = ", oneDNN-packed" if self._packed is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 weights{packed}"


def uses_native_int8(model: nn.Module) -> bool:
    """Whether ``model``'s projections are :class:`Int8Linear` and the native int8 kernel is built:
    the int8 counterpart of the native linear, under which the fused small ops run as well
    (:mod:`engine.models.fused_native`, selected by ``engine.model_runner``)."""
    return any(isinstance(m, Int8Linear) for m in model.modules()) and _kernel() is not None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_weight_dtype(
    weight_dtype: str | WeightDType, cfg: object, dtype: torch.dtype, device: torch.device, fused: bool = True
) -> WeightDType:
    """Refuse (UnsupportedWeightDTypeError, naming why) a ``weight_dtype`` this engine does not
    implement for a model of config ``cfg`` loaded in ``dtype`` on ``device``; the parsed value."""
    wd = WeightDType.parse(weight_dtype)
    if wd is WeightDType.FLOAT32:
        return wd
    if wd is WeightDType.BFLOAT16 and not cpu_has_native_bf16():
        raise UnsupportedWeightDTypeError(
            "weight_dtype bfloat16 is refused: this CPU has no native bf16 arithmetic "
            "(no avx512_bf16/amx_bf16 in /proc/cpuinfo); use float32 or int8"
        )
    name = wd.value
    if getattr(cfg, "moe", None) is not None:
        raise UnsupportedWeightDTypeError(
            f"weight_dtype {name} is not supported for mixture-of-experts models ({getattr(cfg, 'model_type', '?')})"
        )
    if device.type != "cpu" or dtype != torch.float32:
        raise UnsupportedWeightDTypeError(
            f"weight_dtype {name} needs a float32 model on CPU, got {dtype} on {device.type}"
        )
    if not fused:
        raise UnsupportedWeightDTypeError(
            f"weight_dtype {name} needs the fused model (load_model(fuse=True))"
        )
    return wd


def quantize_model(model: nn.Module, weight_dtype: str | WeightDType) -> nn.Module:
    """Apply ``weight_dtype`` to a loaded, fused model in place (see the module docstring);
    returns it. UnsupportedWeightDTypeError for what is not implemented here."""
    p = model.lm_head.weight
    wd = check_weight_dtype(weight_dtype, model.config, p.dtype, p.device)
    if wd is WeightDType.FLOAT32:
        return model
    cls = Int8Linear if wd is WeightDType.INT8 else BF16Linear
    with torch.no_grad():
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, name, cls.from_linear(child))
        model.lm_head = cls.from_linear(model.lm_head)
    return model
