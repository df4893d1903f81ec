"""KVLayout contract, KVHandle validation and the proto converters."""

from __future__ import annotations

import pytest

from engine.block_hash import chain_hashes
from kv_store import convert
from kv_store.handle import BlockLocation, KVHandle
from kv_store.index import LookupResult
from kv_store.layout import KVLayout
from kv_store.store import LeaseGrant
from pdserve.errors import InvalidRequestError, LayoutMismatchError

L = KVLayout("smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", block_size=16)


def test_block_nbytes_formula() -> None:
    assert L.block_nbytes == 30 * 2 * 16 * 3 * 64 * 2
    assert L.block_shape == (30, 2, 16, 3, 64)
    assert KVLayout("m", 2, 1, 8, "float32", 4).block_nbytes == 2 * 2 * 4 * 1 * 8 * 4


def test_check_compatible_names_every_differing_field() -> None:
    L.check_compatible(KVLayout(**{**L.__dict__}))
    other = KVLayout("smollm2-135m", 30, 3, 64, "float16", 32)
    with pytest.raises(LayoutMismatchError) as ei:
        L.check_compatible(other)
    msg = str(ei.value)
    assert "dtype: 'bfloat16' != 'float16'" in msg and "block_size: 16 != 32" in msg
    assert "num_layers:" not in msg and "model_id:" not in msg


@pytest.mark.parametrize(
    "kw",
    [{"model_id": ""}, {"num_layers": 0}, {"head_dim": -1}, {"dtype": "float13"}, {"block_size": 1.5}],
)
def test_invalid_layout(kw: dict) -> None:
    with pytest.raises(InvalidRequestError, match="KV layout"):
        KVLayout(**{**L.__dict__, **kw})


def test_layout_proto_round_trip_and_bad_proto() -> None:
    assert convert.layout_from_proto(convert.layout_to_proto(L)) == L
    msg = convert.layout_to_proto(L)
    msg.dtype = "complex64"
    with pytest.raises(InvalidRequestError, match="layout: KV layout: unsupported dtype"):
        convert.layout_from_proto(msg)


def test_handle_round_trip_and_validation() -> None:
    hs = chain_hashes(list(range(40)), 16, "m", include_partial=True)
    loc = BlockLocation("n1", "127.0.0.1:5", "shm", "host")
    hd = KVHandle("r1", tuple(hs), (loc,) * 3, L, num_tokens=40, lease_id="l1")
    assert convert.handle_from_proto(convert.handle_to_proto(hd)) == hd
    assert hd.blocks_by_node() == {"n1": [0, 1, 2]}
    with pytest.raises(InvalidRequestError, match="locations are per block"):
        KVHandle("r1", tuple(hs), (loc,), L, num_tokens=40)
    with pytest.raises(InvalidRequestError, match="num_tokens=60"):
        KVHandle("r1", tuple(hs), (loc,) * 3, L, num_tokens=60)
    with pytest.raises(InvalidRequestError, match="16-byte"):
        KVHandle("r1", (b"short",), (loc,), L, num_tokens=3)
    msg = convert.handle_to_proto(hd)
    msg.ClearField("layout")
    with pytest.raises(InvalidRequestError, match="layout is required"):
        convert.handle_from_proto(msg)


def test_lookup_and_lease_round_trip() -> None:
    a, b = BlockLocation("a", "x:1"), BlockLocation("b", "x:2", "s", "h")
    r = LookupResult(2, ((a,), (a, b)))
    assert convert.lookup_from_proto(convert.lookup_to_proto(r)) == r
    g = LeaseGrant("id", 5.0, 123.5, "shm", 4096, (3, 1), b)
    assert convert.lease_from_proto(convert.lease_to_proto(g)) == g
