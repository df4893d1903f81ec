"""Every command line of the project documents every flag: a non-empty help text, and ``--help``
shows the default of every flag whose default is not None.

The parsers are built by their modules' ``build_parser()`` functions (the same ones ``main`` uses),
walked down every subcommand. A module that builds an ``ArgumentParser`` but is not listed here
fails :func:`test_every_parser_in_the_tree_is_checked`, so a new command line cannot slip past.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("bench", "scripts")  # scripts run by path; each exposes build_parser()
PACKAGE_DIRS = ("pdserve", "engine", "prefill_worker", "decode_worker", "kv_store", "router", "simulator")


def _worker_parser(role_name: str) -> argparse.ArgumentParser:
    from pdserve.worker_base import Role
    from pdserve.worker_main import build_parser

    return build_parser(Role[role_name])


def _module_parser(module: str) -> Callable[[], argparse.ArgumentParser]:
    return lambda: importlib.import_module(module).build_parser()


# command -> (builder, the source files whose parsers it covers)
MODULE_PARSERS: dict[str, tuple[Callable[[], argparse.ArgumentParser], tuple[str, ...]]] = {
    "pdserve": (
        _module_parser("pdserve.cli"),
        (
            "pdserve/cli.py",
            "pdserve/ray_cli.py",
            "pdserve/bench_cli.py",
            "pdserve/openai_api/cli.py",
            "simulator/cli.py",
        ),
    ),
    "python -m prefill_worker": (
        _module_parser("prefill_worker.__main__"),
        ("prefill_worker/__main__.py", "pdserve/worker_main.py"),
    ),
    "python -m decode_worker": (lambda: _worker_parser("DECODE"), ("pdserve/worker_main.py",)),
    "python -m router": (_module_parser("router.__main__"), ("router/__main__.py",)),
    "python -m kv_store": (_module_parser("kv_store.__main__"), ("kv_store/__main__.py",)),
    "python -m simulator.cli": (_module_parser("simulator.cli"), ("simulator/cli.py",)),
    "python -m pdserve.openai_api": (
        _module_parser("pdserve.openai_api.cli"),
        ("pdserve/openai_api/cli.py",),
    ),
}


def _script_paths() -> list[Path]:
    return sorted(
        p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py") if "ArgumentParser(" in p.read_text()
    )


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_cli_help_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _script_parser(path: Path) -> Callable[[], argparse.ArgumentParser]:
    def build() -> argparse.ArgumentParser:
        mod = _load_script(path)
        assert hasattr(mod, "build_parser"), f"{path.relative_to(ROOT)}: expose build_parser() for this test"
        return mod.build_parser()

    return build


def _all_parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    out = {name: builder for name, (builder, _) in MODULE_PARSERS.items()}
    for p in _script_paths():
        out[str(p.relative_to(ROOT))] = _script_parser(p)
    return out


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def _flag(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def problems(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """What is missing in ``parser`` (not its subcommands): flags without help, defaults not
    shown in ``--help``, subcommands without a help line, a help text that does not render."""
    out = []
    try:
        parser.format_help()
    except (ValueError, TypeError, KeyError) as e:  # e.g. a bare % in a help text
        out.append(f"{path}: --help does not render: {e!r}")
        return out
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest for a in action._choices_actions}
            out += [f"{path} {n}: no help line" for n in action.choices if n not in listed]
            out += [f"{path} {a.dest}: empty help line" for a in action._choices_actions if not a.help]
            continue
        if action.help is argparse.SUPPRESS:  # a deliberately hidden flag
            continue
        if not (action.help or "").strip():
            out.append(f"{path} {_flag(action)}: no help text")
            continue
        if action.default is not None and action.default is not argparse.SUPPRESS:
            text = formatter._expand_help(action)
            if "default" not in text.lower():
                out.append(f"{path} {_flag(action)}: --help does not show its default {action.default!r}")
    return out


def test_every_parser_in_the_tree_is_checked():
    covered = {f for _, files in MODULE_PARSERS.values() for f in files}
    covered |= {str(p.relative_to(ROOT)) for p in _script_paths()}
    found = {
        str(p.relative_to(ROOT))
        for d in PACKAGE_DIRS
        for p in (ROOT / d).rglob("*.py")
        if "ArgumentParser(" in p.read_text()
    }
    assert found <= covered, (
        f"command lines not checked by this test (add them to MODULE_PARSERS): {found - covered}"
    )


@pytest.mark.parametrize("name", sorted(_all_parsers()))
def test_every_flag_has_help_and_shows_its_default(name):
    root = _all_parsers()[name]()
    found = [p for path, parser in _walk(root, name) for p in problems(parser, path)]
    assert not found, "\n".join(found)


def test_pdserve_covers_every_subcommand():
    from pdserve.cli import build_parser

    names = {path for path, _ in _walk(build_parser(), "pdserve")}
    for cmd in ("generate", "serve", "setup", "up", "down", "status", "scale", "bench", "openai"):
        assert f"pdserve {cmd}" in names


def test_the_check_catches_a_flag_without_help_or_default():
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="x")
    ap.add_argument("--bare", type=int, default=3)
    ap.add_argument("--plain", type=int, default=3, help="documented")
    ap.add_argument("--stated", type=int, default=3, help="documented (default: three)")
    ap.add_argument("--optional", default=None, help="no default to show")
    assert problems(ap, "x") == ["x --bare: no help text", "x --plain: --help does not show its default 3"]
    cli_help.apply(ap)
    assert problems(ap, "x") == ["x --bare: no help text"]
    text = ap.format_help()
    assert "documented (default: 3)" in text
    assert "documented (default: three)" in text and "three) (default" not in text
    assert "no default to show" in text and "(default: None)" not in text


def test_prefill_worker_help_lists_prefix_dist_and_worker_flags():
    """``python -m prefill_worker --help`` goes through the staged parse (prefix flags, dist flags,
    worker flags) and prints one help listing all of them, with defaults."""
    r = subprocess.run(
        [sys.executable, "-m", "prefill_worker", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for flag in ("--prefix-fetch", "--dist-init", "--worker-id", "--kv-blocks"):
        assert flag in r.stdout
    assert "(default: 2048)" in r.stdout  # --kv-blocks
    assert r.stdout.count("usage:") == 1
