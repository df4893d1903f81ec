"""Compile small C kernels once per (source, flags, CPU) with the system C compiler and load them.

Used by the kernel modules (attention, linear, int8, fused small ops, argmax, LoRA), most through
:class:`NativeLibrary`. A library is built into
``$PDSERVE_KERNEL_CACHE`` (default ``~/.cache/pdserve/kernels``) under a name that hashes the
source, the compiler, the flags and this CPU's model and feature flags (``-march=native``), so a
cache shared between machines never loads code built for another CPU. The build writes to a
temporary file and renames it: concurrent builders see the whole library or none.

OpenMP: the kernels are compiled with ``-fopenmp`` and resolve ``libgomp.so.1`` to the copy torch
already loaded (same soname), so torch and the kernels share one OpenMP thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# no -ffast-math: it would assume no infinities/NaNs (a NaN in the data must stay visible)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=fast"]
# the reduction loops vectorise only with reassociation; allowed without the no-NaN/no-inf assumptions
CFLAGS += ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


class NativeBuildError(RuntimeError):
    """No C compiler, or the compiler failed (the message says which and why)."""


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines)


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("PDSERVE_KERNEL_CACHE", Path.home() / ".cache" / "pdserve" / "kernels"))


def compiler() -> str:
    """``$CC``, else gcc or cc on PATH; NativeBuildError when there is none."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise NativeBuildError("no C compiler (gcc/cc) on PATH")
    return cc


def build_library(name: str, source: str, defines: list[str] | None = None) -> ctypes.CDLL:
    """Compile ``source`` (C) with ``-D`` ``defines`` (or find it in the cache) and load it.
    Raises NativeBuildError when it cannot be built, OSError when it cannot be loaded."""
    cc = compiler()
    flags = [*CFLAGS, *(f"-D{d}" for d in defines or [])]
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}_{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            tmp_so = Path(tmp) / out.name
            try:
                r = subprocess.run(
                    [cc, *flags, str(src), "-o", str(tmp_so), "-lm"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=300,
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise NativeBuildError(f"{cc} could not run: {e}") from e
            if r.returncode != 0:
                raise NativeBuildError(f"{cc} failed: {r.stderr.strip()[-400:]}")
            os.replace(tmp_so, out)
    return ctypes.CDLL(str(out))


class NativeLibrary:
    """One kernel library, built (or found in the cache) and loaded on the first :meth:`get`.

    ``declare(lib)`` sets the ctypes signatures (and any one-time set-up) of a freshly loaded
    library. When the library cannot be built or loaded, :meth:`get` returns None from then on,
    :attr:`reason` says why, and one INFO line names ``fallback`` (what the caller does instead);
    a failure is not retried. ``disabled()``, when given, is asked first: a non-None answer is the
    reason the library is not used (an operator's switch), and nothing is built.
    """

    def __init__(
        self,
        name: str,
        source: str,
        declare: Callable[[ctypes.CDLL], None],
        fallback: str,
        disabled: Callable[[], str | None] | None = None,
    ) -> None:
        self.name = name
        self._source = source
        self._declare = declare
        self._fallback = fallback
        self._disabled = disabled
        self._lib: ctypes.CDLL | None = None
        self.reason: str | None = None

    @property
    def loaded(self) -> bool:
        """Whether the library is loaded (never builds it; cheap enough for a forward's check)."""
        return self._lib is not None

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None (then :attr:`reason` says why)."""
        if self._lib is not None or self.reason is not None:
            return self._lib
        off = self._disabled() if self._disabled is not None else None
        if off is not None:
            self.reason = off
            return None
        try:
            lib = build_library(self.name, self._source)
        except (OSError, NativeBuildError) as e:
            self.reason = str(e)
            log.info("native %s unavailable (%s): %s", self.name, e, self._fallback)
            return None
        self._declare(lib)
        self._lib = lib
        return lib
