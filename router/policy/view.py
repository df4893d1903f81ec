"""Read-only view of the cluster that placement policies decide on (pure).

An instance is anything with the :class:`InstanceView` attributes: the simulator's instances
implement it directly (no copying per decision); the router builds :class:`InstanceSnapshot`s
from worker load reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_hash import BlockHash
from router.policy.types import InstanceRole


class InstanceView(Protocol):
    """Load and cache state of one engine instance.

    ``queued_tokens``: prompt tokens accepted but not yet prefilled. ``token_budget``: tokens the
    instance computes per step at most. ``cached_prefix_blocks(hashes)``: how many *leading*
    blocks of ``hashes`` the instance can serve from its cache (HBM or its host KV pool).
    """

    @property
    def instance_id(self) -> str: ...
    @property
    def role(self) -> InstanceRole: ...
    @property
    def queued_tokens(self) -> int: ...
    @property
    def queued_requests(self) -> int: ...
    @property
    def running_requests(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def total_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def token_budget(self) -> int: ...

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int: ...


@dataclass(frozen=True)
class InstanceSnapshot:
    """A plain-value :class:`InstanceView` (router load reports, tests)."""

    instance_id: str
    role: InstanceRole
    queued_tokens: int = 0
    queued_requests: int = 0
    running_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    token_budget: int = 2048
    cached: frozenset[BlockHash] = field(default_factory=frozenset)

    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n


class ClusterView:
    """The instances a decision may use, in a stable order (ties break by this order)."""

    def __init__(self, instances: Iterable[InstanceView]) -> None:
        self.instances: tuple[InstanceView, ...] = tuple(instances)
        self._by_id = {i.instance_id: i for i in self.instances}
        if len(self._by_id) != len(self.instances):
            raise ValueError("instance ids must be unique")

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, instance_id: str) -> InstanceView:
        return self._by_id[instance_id]

    def with_role(self, *roles: InstanceRole) -> list[InstanceView]:
        return [i for i in self.instances if i.role in roles]
