"""The checked-in generated protobuf code must equal what scripts/gen_protos.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = "generated code is stale: run `python scripts/gen_protos.py` and commit pdserve/v1/"


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    gen = _gen_module()
    fresh = gen.generate(tmp_path)
    assert fresh, "no .proto files found under proto/pdserve/v1"
    checked_in = sorted(
        p.relative_to(ROOT) for p in (ROOT / gen.PACKAGE_DIR).iterdir() if gen.is_generated(p.name)
    )
    assert checked_in == fresh, f"{FIX} (files differ: {sorted(set(checked_in) ^ set(fresh))})"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"{FIX} (content differs: {stale})"


def test_generated_imports_use_package_root() -> None:
    from pdserve.v1 import client_pb2_grpc, common_pb2, kv_store_pb2_grpc, worker_pb2_grpc

    assert common_pb2.DESCRIPTOR.package == "pdserve.v1"
    for mod, svc in (
        (client_pb2_grpc, "Generate"),
        (worker_pb2_grpc, "Worker"),
        (kv_store_pb2_grpc, "KVStore"),
    ):
        assert hasattr(mod, f"{svc}Stub") and hasattr(mod, f"{svc}Servicer")
