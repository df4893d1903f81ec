"""Builds the router's placement policy from its config (the one place that picks a latency seed).

Latency seed, in order: a profile measured on this hardware (``pdserve profile``; read through
``simulator.latency.ProfiledLatencyModel`` and linearised by ``LinearLatency.from_model``), else
(goodput) the first step-time profile a worker reports when it registers, else
:class:`LinearLatency`'s defaults. Goodput also scales each worker's predictions by its own profile. Goodput-aware placement corrects it online either way.
"""

from __future__ import annotations

import enum

from router.policy import GoodputConfig, LinearLatency, PlacementPolicy, PolicyKind, make_policy

CLI_ALIASES = {"cache_aware": PolicyKind.GLOBAL_CACHE_AWARE}
"""Extra ``--policy`` spellings (the CLI also takes every :class:`PolicyKind` value)."""


class _Needs(enum.Enum):
    LATENCY = "latency"
    NOTHING = "nothing"


_NEEDS = {
    PolicyKind.GOODPUT: _Needs.LATENCY,
    PolicyKind.LOCAL_CACHE_AWARE: _Needs.LATENCY,
    PolicyKind.GLOBAL_CACHE_AWARE: _Needs.LATENCY,
}


def parse_policy(name: str) -> PolicyKind:
    """``--policy`` value -> kind (``ValueError`` names the choices)."""
    if name in CLI_ALIASES:
        return CLI_ALIASES[name]
    try:
        return PolicyKind(name)
    except ValueError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_choices()}") from None


def policy_choices() -> list[str]:
    return [k.value for k in PolicyKind] + list(CLI_ALIASES)


_READS_STORE_PREFIX = frozenset({PolicyKind.GOODPUT, PolicyKind.GLOBAL_CACHE_AWARE})


def uses_prefix_lookup(kind: PolicyKind) -> bool:
    """Whether placement reads the prompt's prefix in the KV store (``RequestInfo.store_prefix_blocks``,
    a lookup per request): the policies that weigh fetching a prefix from anywhere in the cluster."""
    return kind in _READS_STORE_PREFIX


def seed_latency(profile_path: str | None, token_budget: int = 2048) -> LinearLatency:
    if not profile_path:
        return LinearLatency()
    from simulator.latency import ProfiledLatencyModel  # only when a profile is given

    return LinearLatency.from_model(ProfiledLatencyModel(profile_path), token_budget=token_budget)


def build_policy(
    kind: PolicyKind, *, profile_path: str | None = None, goodput: GoodputConfig | None = None, seed: int = 0
) -> PlacementPolicy:
    kw: dict = {"seed": seed}
    if _NEEDS.get(kind) is _Needs.LATENCY and (profile_path or kind is not PolicyKind.GOODPUT):
        kw["latency"] = seed_latency(profile_path)
    # goodput without an explicit profile: the seed's defaults until the first worker reports its
    # start-up profile, which then becomes the model (``GoodputAwarePolicy``)
    if kind is PolicyKind.GOODPUT:
        kw["config"] = goodput or GoodputConfig()
    return make_policy(kind, **kw)
