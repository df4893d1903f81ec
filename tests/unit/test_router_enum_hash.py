"""The router's hot-path enums hash by identity (#12: Enum's own __hash__ is a Python call,
hash(name), about 80 per direct request); members stay equal only to themselves, usable as dict
keys and set members, and looked up by value as before."""

from __future__ import annotations

import pickle

import pytest

from router.lifecycle.resources import ResourceKind
from router.lifecycle.states import State
from router.policy.latency import Phase
from router.registry import WorkerKind


@pytest.mark.parametrize("cls", [State, Phase, ResourceKind, WorkerKind])
def test_identity_hash_keeps_enum_semantics(cls) -> None:
    members = list(cls)
    assert cls.__hash__ is object.__hash__
    assert len(members) >= 2  # the hash line did not become a member
    d = {m: i for i, m in enumerate(members)}
    assert [d[m] for m in members] == list(range(len(members)))
    for m in members:
        assert hash(m) == object.__hash__(m)
        assert cls(m.value) is m
        assert pickle.loads(pickle.dumps(m)) is m
        assert d[pickle.loads(pickle.dumps(m))] == d[m]
        assert m != m.value  # a plain Enum: not equal to its value
    assert len(set(members) | set(members)) == len(members)
