"""Which decode attention backend an engine uses, chosen explicitly and refused when unavailable.

Backends (:class:`AttentionBackend`; ``EngineConfig.attention_backend``, else the
``PDSERVE_ATTENTION`` environment variable, else ``auto``):

* ``native``: the C kernel of :mod:`engine.attention_native`, reading the paged cache in place
  (fp32 CPU tensors, needs a C compiler);
* ``gather``: the torch path of :mod:`engine.attention` that gathers each decode's blocks into a
  fresh tensor and attends with a length mask (any device and dtype; ``torch`` is its old name);
* ``torch_paged``: :mod:`engine.attention_paged`, a device-agnostic torch kernel that walks the
  block tables in tiles with an online softmax (no copy of the whole context; any device/dtype,
  CUDA-graph capturable);
* ``flashinfer`` / ``flash_attn``: :mod:`engine.attention_cuda`, FlashInfer's paged decode or
  flash-attn's ``flash_attn_with_kvcache`` with block tables (CUDA, fp16/bf16, the package
  importable; flash-attn 2 also needs a block size that is a multiple of 256);
* ``auto``: ``native`` where it builds (fp32 CPU), else ``gather``: the engine's behaviour before
  the choice was explicit (unchanged on every device until the other backends are measured
  better there).

Prefill chunks always use SDPA (no earlier context) or the gather path (chunked prefill,
prefix hits): they are compute-bound and the gather is amortised over the chunk's queries.

A backend named explicitly that cannot run here is refused with
:class:`~pdserve.errors.FailedPreconditionError` naming it and why; it is never replaced by
another. :func:`resolve_backend` is the pure rule; :func:`probe` gathers the facts it needs.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from dataclasses import dataclass

from pdserve.errors import FailedPreconditionError

ENV_VAR = "PDSERVE_ATTENTION"


class AttentionBackend(enum.Enum):
    AUTO = "auto"
    NATIVE = "native"
    GATHER = "gather"
    TORCH_PAGED = "torch_paged"
    FLASHINFER = "flashinfer"
    FLASH_ATTN = "flash_attn"

    @property
    def reads_rows(self) -> bool:
        """Whether decodes read the cache through :class:`~engine.attention.DecodeRows` (every
        backend but ``gather``): a speculative decode's tokens are then decode rows of their own."""
        return self is not AttentionBackend.GATHER

    @classmethod
    def parse(cls, value: str | AttentionBackend) -> AttentionBackend:
        """The backend named ``value`` (``torch`` is accepted as the old name of ``gather``);
        raises ValueError naming the valid names."""
        if isinstance(value, AttentionBackend):
            return value
        v = str(value).strip().lower().replace("-", "_")
        if v == "torch":
            return cls.GATHER
        try:
            return cls(v)
        except ValueError:
            names = [b.value for b in cls]
            raise ValueError(f"unknown attention backend {value!r}: use one of {names}") from None


@dataclass(frozen=True)
class BackendFacts:
    """What decides which backends can run (see :func:`probe`)."""

    device_type: str  # "cpu" | "cuda"
    dtype: str  # torch dtype name: "float32", "float16", "bfloat16"
    block_size: int
    native_reason: str | None  # None: the native kernel is built for this shape
    flashinfer: bool  # the package is importable
    flash_attn: bool


def unavailable_reason(backend: AttentionBackend, f: BackendFacts) -> str | None:
    """Why ``backend`` cannot run with facts ``f`` (None: it can). ``auto`` always can."""
    b = AttentionBackend
    if backend in (b.AUTO, b.GATHER, b.TORCH_PAGED):
        return None
    if backend is b.NATIVE:
        if f.device_type != "cpu" or f.dtype != "float32":
            return f"it needs float32 tensors on the CPU (here: {f.dtype} on {f.device_type})"
        return None if f.native_reason is None else f"the kernel is not available: {f.native_reason}"
    if f.device_type != "cuda":
        return f"it needs a CUDA device (here: {f.device_type})"
    if f.dtype not in ("float16", "bfloat16"):
        return f"it needs dtype float16 or bfloat16 (here: {f.dtype})"
    if backend is b.FLASHINFER:
        return None if f.flashinfer else "the flashinfer package is not importable"
    if not f.flash_attn:
        return "the flash_attn package is not importable"
    if f.block_size % 256:
        return f"flash-attn's paged KV needs a block_size that is a multiple of 256 (here: {f.block_size})"
    return None


def resolve_backend(requested: AttentionBackend, f: BackendFacts) -> AttentionBackend:
    """The backend an engine runs: ``requested`` itself when it can run (``auto``: ``native``
    where it is available, else ``gather``); raises FailedPreconditionError naming an explicitly
    requested backend that cannot."""
    if requested is AttentionBackend.AUTO:
        native_ok = unavailable_reason(AttentionBackend.NATIVE, f) is None
        return AttentionBackend.NATIVE if native_ok else AttentionBackend.GATHER
    why = unavailable_reason(requested, f)
    if why is not None:
        raise FailedPreconditionError(
            f"attention backend {requested.value!r} cannot run here: {why}; "
            f"name another with attention_backend / {ENV_VAR} (e.g. 'auto')"
        )
    return requested


def requested_backend(configured: str | AttentionBackend | None) -> AttentionBackend:
    """The backend asked for: ``configured`` (an EngineConfig value) when set, else the
    ``PDSERVE_ATTENTION`` environment variable, else ``auto``."""
    if configured is not None:
        return AttentionBackend.parse(configured)
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return AttentionBackend.AUTO
    try:
        return AttentionBackend.parse(env)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}: {e}") from None


def probe(device_type: str, dtype: str, block_size: int, group: int, head_dim: int) -> BackendFacts:
    """The facts of this process: whether the native kernel builds for (``group`` query heads
    per KV head, ``head_dim``) on fp32 CPU and whether flashinfer / flash_attn are importable
    (not imported: an import can be slow, it happens when the backend is used)."""
    from engine import attention_native

    native_reason: str | None = "not probed (not fp32 on the CPU)"
    if device_type == "cpu" and dtype == "float32":
        ok = attention_native.available(group, head_dim)
        native_reason = None if ok else str(attention_native.unavailable_reason())
    return BackendFacts(
        device_type,
        dtype,
        block_size,
        native_reason,
        importlib.util.find_spec("flashinfer") is not None,
        importlib.util.find_spec("flash_attn") is not None,
    )
