"""engine.native_build.NativeLibrary: built once on first use, a failure remembered with its reason
(and never retried), an operator's switch honoured before anything is built."""

from __future__ import annotations

import ctypes

import pytest

from engine import native_build
from engine.native_build import NativeLibrary

_GOOD = "int plus_one(int x) { return x + 1; }\n"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path / "kernels"))


def _needs_compiler() -> None:
    try:
        native_build.compiler()
    except native_build.NativeBuildError as e:
        pytest.skip(f"no C compiler: {e}")


def test_builds_once_declares_once_and_loads() -> None:
    _needs_compiler()
    declared: list[ctypes.CDLL] = []

    def declare(lib: ctypes.CDLL) -> None:
        lib.plus_one.argtypes = [ctypes.c_int]
        lib.plus_one.restype = ctypes.c_int
        declared.append(lib)

    nl = NativeLibrary("plus_one_test", _GOOD, declare, "python")
    assert not nl.loaded and nl.reason is None
    lib = nl.get()
    assert lib is not None and nl.loaded and nl.reason is None
    assert lib.plus_one(41) == 42
    assert nl.get() is lib and len(declared) == 1


def test_build_failure_is_a_reason_and_not_retried(monkeypatch, caplog) -> None:
    _needs_compiler()
    calls: list[str] = []
    real = native_build.build_library

    def counting(name: str, source: str, defines=None):
        calls.append(name)
        return real(name, source, defines)

    monkeypatch.setattr(native_build, "build_library", counting)
    nl = NativeLibrary("broken_test", "this is not C;\n", lambda lib: None, "the torch path")
    with caplog.at_level("INFO", logger="engine.native_build"):
        assert nl.get() is None
    assert nl.reason is not None and "failed" in nl.reason
    assert not nl.loaded
    assert any(
        "broken_test unavailable" in r.message and "the torch path" in r.message for r in caplog.records
    )
    assert nl.get() is None and calls == ["broken_test"]


def test_no_compiler_is_a_reason(monkeypatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    nl = NativeLibrary("no_cc_test", _GOOD, lambda lib: None, "python")
    assert nl.get() is None
    assert nl.reason is not None and "/nonexistent/cc" in nl.reason


def test_switched_off_builds_nothing(monkeypatch) -> None:
    def must_not_build(*a, **k):
        raise AssertionError("built while switched off")

    monkeypatch.setattr(native_build, "build_library", must_not_build)
    nl = NativeLibrary("off_test", _GOOD, lambda lib: None, "python", disabled=lambda: "SWITCH=off")
    assert nl.get() is None and nl.reason == "SWITCH=off" and not nl.loaded
