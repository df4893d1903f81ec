"""The ``kv_transfer`` section of a Ray cluster config and a worker's seat in the process group."""

from __future__ import annotations

import pytest

from pdserve.cluster_config import KVTransferConfig, from_dict
from pdserve.errors import InvalidRequestError
from pdserve.kv_transfer import DistBackend, KVTransport
from pdserve.ray_actors import DistSeat


def test_default_is_the_store_path() -> None:
    c = from_dict({"model": "/m"})
    assert c.kv_transfer == KVTransferConfig()
    assert c.kv_transfer.kind is KVTransport.STORE


def test_dist_section_parses_every_key() -> None:
    c = from_dict(
        {
            "model": "/m",
            "prefill": {"device": "cuda"},
            "decode": {"device": "cuda"},
            "kv_transfer": {
                "kind": "dist",
                "backend": "NCCL",
                "port": 29511,
                "timeout_s": 30,
                "outbox_bytes": 1 << 20,
                "socket_ifname": "eth0",
            },
        }
    )
    t = c.kv_transfer
    assert (t.kind, t.backend, t.port, t.timeout_s, t.outbox_bytes, t.socket_ifname) == (
        KVTransport.DIST,
        DistBackend.NCCL,
        29511,
        30.0,
        1 << 20,
        "eth0",
    )


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"kind": "rdma"}, r"kv_transfer\.kind: 'rdma' is not one of \['store', 'dist'\]"),
        ({"backend": "mpi"}, r"kv_transfer\.backend"),
        ({"port": 70000}, r"kv_transfer\.port: must be in \[0, 65535\]"),
        ({"timeout_s": 0}, r"kv_transfer\.timeout_s: must be > 0"),
        ({"outbox_bytes": 0}, r"kv_transfer\.outbox_bytes: must be >= 1"),
        ({"kind": "dist", "backend": "nccl"}, r"nccl moves CUDA tensors: set prefill\.device: cuda"),
        ({"bogus": 1}, r"kv_transfer: unknown key\(s\) \['bogus'\]"),
    ],
)
def test_bad_kv_transfer_names_the_key(section: dict, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        from_dict({"model": "/m", "kv_transfer": section})


def test_dist_seat_rank_zero_picks_the_address_the_others_are_given_it() -> None:
    assert DistSeat(0, 3).init_method == ""
    assert DistSeat(2, 3, "tcp://10.0.0.1:29500").rank == 2
    with pytest.raises(ValueError, match="not in"):
        DistSeat(3, 3, "tcp://h:1")
    with pytest.raises(ValueError, match="rank 0 picks"):
        DistSeat(0, 3, "tcp://h:1")
    with pytest.raises(ValueError, match="rank 0 picks"):
        DistSeat(1, 3)
