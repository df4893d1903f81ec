#!/usr/bin/env python
"""Regenerate the Python code of the protos: ``python scripts/gen_protos.py``.

The one way the files under ``pdserve/v1/`` (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are
made. ``proto/`` is the include root, so ``proto/pdserve/v1/x.proto`` becomes ``pdserve/v1/x_pb2.py``
and imports read ``from pdserve.v1 import common_pb2``. ``tests/unit/test_proto_drift.py`` runs
:func:`generate` into a temporary directory and fails when the checked-in files differ.

The ``.pyi`` stubs are passed through ``ruff check --fix`` and ``ruff format`` with the project's
configuration, so that running ruff over the tree leaves them unchanged (protoc's stubs are not
ruff-clean, and ruff would otherwise rewrite them and break the drift test). The ``.py`` files are
excluded from ruff in pyproject.toml and left exactly as protoc writes them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("pdserve") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto files, relative to ``proto/``, sorted."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def is_generated(name: str) -> bool:
    return name.endswith(GENERATED_SUFFIXES)


def generate(out_root: Path) -> list[Path]:
    """Generate into ``out_root/pdserve/v1/``; returns the generated paths relative to out_root."""
    import grpc_tools
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={wkt}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {files}")
    stubs = sorted(str(p) for p in (out_root / PACKAGE_DIR).glob("*_pb2.pyi"))
    _ruff(["check", "--fix", "--exit-zero", "--quiet", *stubs])
    _ruff(["format", "--quiet", *stubs])
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).iterdir() if is_generated(p.name))


def _ruff(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "ruff", *args[:1], "--config", str(ROOT / "pyproject.toml"), *args[1:]]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    target = args.out / PACKAGE_DIR
    if target.is_dir():  # drop files of protos that no longer exist
        for p in target.iterdir():
            if is_generated(p.name):
                p.unlink()
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
