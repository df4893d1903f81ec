"""The fp32 CPU GEMM of prefill-sized projections (issue #17 prefill, #16 throughput): oneDNN.

``F.linear`` on float32 CPU tensors calls MKL's ``sgemm``. On this project's host (AMD EPYC,
Zen 5, AVX-512) MKL does not take its AVX-512 code (it selects those by vendor), while oneDNN,
which torch also ships (``torch.ops.mkldnn._linear_pointwise``, the kernel torch's inductor
emits for CPU linears), JIT-compiles for the CPU's features whatever the vendor. Measured
2026-12-06 09:1x UTC, one thread, CPU time, SmolLM2-135M's four projection shapes (load 7-12):
MKL 81 / 90 / 94 / 99 / 96 GFLOP/s, oneDNN 171 / 193 / 212 / 217 / 215 GFLOP/s at 64 / 128 /
256 / 512 / 1024 rows; at 1-32 rows oneDNN is also ahead of MKL (1.2-1.9x) but behind the native
skinny kernel (:mod:`engine.models.linear_native`), which keeps those.

:func:`linear` is ``F.linear``'s contract with that choice made: ``GemmBackend.ONEDNN`` for
float32 CPU tensors outside autograd, ``F.linear`` for everything else. oneDNN sums in another
order than MKL: results differ by rounding only (tests/unit/test_gemm.py), and a row's value does
not depend on the batch's other rows beyond that rounding choice of the kernel (it is not a
bitwise guarantee, as it is not for MKL).

The backend (:func:`gemm_backend`): env ``PDSERVE_GEMM`` = ``auto`` (default: ``onednn`` where it
runs here, else ``blas``), ``onednn`` (refused with :class:`UnsupportedGemmError` naming why
where it cannot run) or ``blas`` (``F.linear`` always). Whether oneDNN runs is probed once per
process (torch built with it, ``torch.backends.mkldnn`` enabled, the op present and equal to
``F.linear`` on a probe within rounding); the reason it does not is kept and logged once.
"""

from __future__ import annotations

import enum
import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from engine.models import linear_native
from engine.models.linear_native import NativeLinear

log = logging.getLogger(__name__)

ENV = "PDSERVE_GEMM"


class UnsupportedGemmError(ValueError):
    """A GEMM backend name that does not exist, or ``onednn`` where it cannot run (says why)."""


class GemmBackend(enum.Enum):
    AUTO = "auto"
    ONEDNN = "onednn"
    BLAS = "blas"

    @staticmethod
    def parse(name: str | GemmBackend) -> GemmBackend:
        """The member named ``name``; UnsupportedGemmError naming the choices otherwise."""
        if isinstance(name, GemmBackend):
            return name
        try:
            return GemmBackend(name)
        except ValueError:
            choices = ", ".join(m.value for m in GemmBackend)
            raise UnsupportedGemmError(f"{ENV} must be one of {choices}; got {name!r}") from None


_lock = threading.Lock()
_probed = False
_reason: str | None = None  # why oneDNN cannot run here (None: it can, or not probed yet)
_resolved: dict[str, GemmBackend] = {}  # env value -> resolved backend


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` by oneDNN, unconditionally (callers check
    :func:`onednn_unavailable_reason` first; :func:`linear` chooses)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_unavailable_reason() -> str | None:
    """Why oneDNN's linear cannot run in this process (None: it can). Probed once."""
    global _probed, _reason
    with _lock:
        if not _probed:
            _reason = _probe()
            _probed = True
            if _reason is not None:
                log.info("fp32 GEMM: oneDNN unavailable (%s); F.linear (BLAS) serves", _reason)
        return _reason


def _probe() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn is disabled"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "torch.ops.mkldnn._linear_pointwise is missing in this torch"
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((37, 96), (80, 96), (80,)))
    try:
        with torch.inference_mode():
            y = onednn_linear(x, w, b)
    except RuntimeError as e:  # the op exists but refuses (e.g. a CPU oneDNN does not support)
        return f"oneDNN's linear failed on a probe: {e}"
    ref = F.linear(x.double(), w.double(), b.double())
    if y.shape != ref.shape or y.dtype != torch.float32 or not torch.allclose(y.double(), ref, atol=1e-4):
        return "oneDNN's linear disagreed with F.linear on a probe"
    return None


def gemm_backend() -> GemmBackend:
    """``ONEDNN`` or ``BLAS`` from env ``PDSERVE_GEMM`` (see the module doc); UnsupportedGemmError
    for an unknown name, or ``onednn`` asked for where it cannot run."""
    env = os.environ.get(ENV, GemmBackend.AUTO.value)
    got = _resolved.get(env)
    if got is not None:
        return got
    gb = GemmBackend.parse(env)
    if gb is not GemmBackend.BLAS:
        why = onednn_unavailable_reason()
        if why is not None:
            if gb is GemmBackend.ONEDNN:
                raise UnsupportedGemmError(f"{ENV}=onednn is refused: {why}; use {ENV}=blas")
            gb = GemmBackend.BLAS
        else:
            gb = GemmBackend.ONEDNN
    _resolved[env] = gb
    return gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: by oneDNN when :func:`gemm_backend` is ``ONEDNN`` and every
    tensor is float32 on the CPU outside autograd (no grad mode), else ``F.linear`` itself."""
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and not torch.is_grad_enabled()
        and gemm_backend() is GemmBackend.ONEDNN
    ):
        return onednn_linear(x, weight if weight.is_contiguous() else weight.contiguous(), bias)
    return F.linear(x, weight, bias)


def _plain(mod: nn.Module) -> bool:
    """An ``nn.Linear`` or :class:`NativeLinear` exactly (no subclass with its own forward), no hooks."""
    return type(mod) in (nn.Linear, NativeLinear) and not mod._forward_hooks and not mod._forward_pre_hooks


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for a model's projection module, with batches of more than
    ``linear_native.NATIVE_MAX_ROWS`` rows (prefill chunks; the rows a small-batch kernel would
    not take) on :func:`linear`: for a plain linear (``nn.Linear`` or ``NativeLinear``), and for
    a module that wraps one as ``base`` and adds to its output with ``add_update(x, base_out)``
    (:class:`engine.lora.layers.LoRALinear`). Any other module (int8, offloaded, hooked), and
    every smaller batch, is called as it is."""
    if x.numel() <= linear_native.NATIVE_MAX_ROWS * x.shape[-1]:
        return mod(x)
    if _plain(mod):
        return linear(x, mod.weight, mod.bias)
    base = getattr(mod, "base", None)
    add = getattr(mod, "add_update", None)
    if (
        add is not None
        and base is not None
        and _plain(base)
        and not mod._forward_hooks
        and not mod._forward_pre_hooks
    ):
        return add(x, linear(x, base.weight, base.bias))
    return mod(x)
