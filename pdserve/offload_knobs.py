"""FlexGen offloading settings (issue #15 part 4) for every front end, checked in one place.

The weight budget (``--weight-budget-gib`` / pool key ``weight_budget_gib``) predates this module;
:data:`KNOBS` adds the weight tiers behind it (host memory, scratch folder), the KV budget and its
tiers, the joint device budget and the offline batch. Each :class:`OffloadKnob` is an ``EngineConfig`` field
and its front-end name (``kv_budget_gib``: the Ray pool key; ``--kv-budget-gib``: the worker /
``pdserve serve`` / ``pdserve generate`` flag). Sizes are GiB as a float, as the weight budget's
are; a host tier's size may be ``inf`` (no limit, its default). :func:`problems` is the one set of checks
(pure: a mapping of names to values in, ``(name, why)`` out), worded with the caller's names so
that an error names the flag or pool key the operator wrote; the engine's own validation
(:class:`engine.config.EngineConfig`) stays the last word.
"""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

GIB = 1 << 30
WEIGHT = "weight_budget_gib"  # the existing weight budget's name (flag --weight-budget-gib)
KV = "kv_budget_gib"
DEVICE = "device_budget_gib"
OFFLINE = "offline_batch"
WEIGHT_HOST = "weight_host_gib"
WEIGHT_DIR = "weight_offload_dir"
KV_HOST = "kv_host_gib"
KV_DIR = "kv_offload_dir"
_SIZES = (WEIGHT, WEIGHT_HOST, KV, DEVICE, KV_HOST)
_UNLIMITED = (WEIGHT_HOST, KV_HOST)  # sizes whose inf means no limit


class KnobKind(enum.Enum):
    """What a knob's value is: a size in GiB (a float), an on/off flag, or a folder."""

    GIB = "gib"
    FLAG = "flag"
    PATH = "path"


@dataclass(frozen=True)
class OffloadKnob:
    """One setting: ``name`` (pool key; the flag is ``--`` + dashes), the ``EngineConfig``
    ``field`` it sets, its :class:`KnobKind`, and a help line."""

    name: str
    field: str
    kind: KnobKind
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def gib(self) -> bool:
        return self.kind is KnobKind.GIB

    def engine_value(self, v: object) -> int | bool | str | None:
        """The ``EngineConfig`` value of front-end value ``v`` (None / False: not set; a size of
        ``inf``: no limit, None)."""
        if self.kind is KnobKind.FLAG:
            return bool(v)
        if v is None:
            return None
        if self.kind is KnobKind.PATH:
            return str(v)
        x = float(v)  # type: ignore[arg-type]
        return None if math.isinf(x) else int(x * GIB)


KNOBS: tuple[OffloadKnob, ...] = (
    OffloadKnob(
        WEIGHT_HOST,
        "weight_host_budget_bytes",
        KnobKind.GIB,
        "with --weight-budget-gib or --device-budget-gib: host memory for offloaded layers, in GiB; "
        "the rest go to a scratch file on disk (0: every offloaded layer on disk; inf: no limit) "
        "(default: no limit)",
    ),
    OffloadKnob(
        WEIGHT_DIR,
        "weight_offload_dir",
        KnobKind.PATH,
        "with --weight-budget-gib or --device-budget-gib: folder of the disk tier's scratch file "
        "(default: the system temp folder)",
    ),
    OffloadKnob(
        KV,
        "kv_memory_budget_bytes",
        KnobKind.GIB,
        "device memory the KV pool may use, in GiB (FlexGen KV offloading: the KV of the layers "
        "beyond it lives in host memory and is copied in a layer ahead; output unchanged; at least "
        "two layers' KV; not with --tp > 1) (default: the whole pool on the device)",
    ),
    OffloadKnob(
        KV_HOST,
        "kv_host_budget_bytes",
        KnobKind.GIB,
        "with --kv-budget-gib or --device-budget-gib: host memory for offloaded layers' KV, in GiB; "
        "the other offloaded layers' KV goes to a memory-mapped scratch file on disk (0: all on "
        "disk; inf: no limit) (default: no limit)",
    ),
    OffloadKnob(
        KV_DIR,
        "kv_offload_dir",
        KnobKind.PATH,
        "with --kv-budget-gib or --device-budget-gib: folder of the KV disk pool's scratch file "
        "(default: the system temp folder)",
    ),
    OffloadKnob(
        DEVICE,
        "device_memory_budget_bytes",
        KnobKind.GIB,
        "device memory the weights and the KV pool may use together, in GiB: the offload cost model "
        "splits it (measured at load); not with --weight-budget-gib or --kv-budget-gib (default: no "
        "joint budget)",
    ),
    OffloadKnob(
        OFFLINE,
        "offline_batch",
        KnobKind.FLAG,
        "an offline throughput job: the batch size (max running sequences) becomes the offload cost "
        "model's choice (bound: the max-num-seqs setting and the KV pool), logged; needs "
        "--weight-budget-gib or --device-budget-gib, not with --scheduling-policy mlfq",
    ),
)
"""The settings added after the weight budget (``test_offload_knobs`` checks each reaches the engine)."""


def problems(
    values: Mapping[str, object],
    name: Callable[[str], str],
    scheduling_policy: str | None = None,
    tp: int = 1,
) -> list[tuple[str, str]]:
    """What is wrong with ``values`` (keys: :data:`WEIGHT` and each knob's ``name``; a size or a
    folder of None and ``offline_batch`` False mean not set: a pool's 0 / "" / ``inf`` host tier
    is passed as None), as ``(key, why)``; ``why`` names other settings through ``name``
    (``name(KV)`` is ``--kv-budget-gib`` or ``pools.decode.kv_budget_gib``). Empty when fine."""
    out: list[tuple[str, str]] = []
    for k in _SIZES:
        v = values.get(k)
        if v is not None and not (
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and v >= 0
            and (math.isfinite(v) or (k in _UNLIMITED and math.isinf(v)))
        ):
            out.append((k, f"must be >= 0 GiB, got {v}"))
    if out:
        return out
    given = {k for k in (*_SIZES, WEIGHT_DIR, KV_DIR) if values.get(k) is not None}
    if values.get(OFFLINE):
        given.add(OFFLINE)
    for k in (WEIGHT_HOST, WEIGHT_DIR):
        if k in given and not given & {WEIGHT, DEVICE}:
            out.append(
                (
                    k,
                    f"places offloaded weights: it needs weight offloading ({name(WEIGHT)} or "
                    f"{name(DEVICE)})",
                )
            )
    for k in (KV_HOST, KV_DIR):
        if k in given and not given & {KV, DEVICE}:
            out.append((k, f"places offloaded KV: it needs KV offloading ({name(KV)} or {name(DEVICE)})"))
    if DEVICE in given:
        for other in (WEIGHT, KV):
            if other in given:
                out.append(
                    (
                        other,
                        f"contradicts {name(DEVICE)} (weights and KV together, split by the cost "
                        f"model): set one or the other",
                    )
                )
    if OFFLINE in given:
        if not given & {WEIGHT, DEVICE}:
            out.append(
                (
                    OFFLINE,
                    f"sizes the batch for offloaded weights: it needs {name(WEIGHT)} or {name(DEVICE)}",
                )
            )
        if scheduling_policy == "mlfq":
            out.append(
                (
                    OFFLINE,
                    "is an offline throughput job, scheduling policy mlfq an interactive one: use "
                    "fcfs or priority",
                )
            )
    if tp > 1:
        for k in (KV, DEVICE):
            if k in given:
                out.append((k, f"offloading is not supported with tensor parallelism (tp {tp})"))
    return out


def add_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup, scope: str = "") -> None:
    """Add every knob's flag (``--weight-host-gib``, ``--weight-offload-dir``,
    ``--kv-budget-gib``, ``--device-budget-gib``, ``--offline-batch``) to ``ap`` (default: not
    set). ``scope`` prefixes each help line ("with --embedded: ")."""
    for k in KNOBS:
        if k.kind is KnobKind.GIB:
            ap.add_argument(k.flag, type=float, default=None, metavar="GIB", help=scope + k.help)
        elif k.kind is KnobKind.PATH:
            ap.add_argument(k.flag, default=None, metavar="DIR", help=scope + k.help)
        else:
            ap.add_argument(k.flag, action="store_true", help=scope + k.help)


def flag_values(a: argparse.Namespace) -> dict[str, object]:
    """The weight budget and every knob from parsed flags (keys as :func:`problems` takes them)."""
    return {WEIGHT: getattr(a, WEIGHT, None), **{k.name: getattr(a, k.name) for k in KNOBS}}


def flag_errors(a: argparse.Namespace, scheduling_policy: str | None = None, tp: int = 1) -> list[str]:
    """:func:`problems` of parsed flags, worded with the flags ("--kv-budget-gib contradicts
    --device-budget-gib ...")."""

    def flag(n: str) -> str:
        return "--" + n.replace("_", "-")

    return [f"{flag(k)} {why}" for k, why in problems(flag_values(a), flag, scheduling_policy, tp)]


def given_flags(a: argparse.Namespace) -> list[str]:
    """The flags of :func:`flag_values` given on ``a`` (a size of 0 counts as given)."""
    return ["--" + n.replace("_", "-") for n, v in flag_values(a).items() if v is not None and v is not False]


def engine_kwargs(values: Mapping[str, object]) -> dict[str, int | bool | None]:
    """Every knob as ``EngineConfig`` keyword arguments (a size of None: not set)."""
    return {k.field: k.engine_value(values.get(k.name)) for k in KNOBS}


def as_flags(a: argparse.Namespace) -> tuple[str, ...]:
    """The knobs given on ``a`` as worker flags (``pdserve serve`` forwards them)."""
    out: list[str] = []
    for k in KNOBS:
        v = getattr(a, k.name)
        if k.kind is KnobKind.GIB and v is not None:
            out += [k.flag, repr(float(v))]
        elif k.kind is KnobKind.PATH and v is not None:
            out += [k.flag, str(v)]
        elif k.kind is KnobKind.FLAG and v:
            out.append(k.flag)
    return tuple(out)
