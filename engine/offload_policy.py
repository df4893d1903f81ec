"""Weight and KV offloading (FlexGen), the pure policy: where each decoder layer's weights live,
which layers' KV lives in the host pool (:func:`place_kv`, section at the end), the predicted
step time of a placement, and the batch size for offline throughput jobs. No I/O, no torch, no
clock; :mod:`engine.offload` and :mod:`engine.kv_offload` do the copies.

Model of one forward step (what :class:`engine.offload.OffloadedWeights` does, so predictions
and behaviour agree):

* weights outside the decoder layers (embeddings, ``lm_head``, final norm) always stay on the
  device; a decoder layer is on the DEVICE (resident), or on the HOST (a host-memory buffer) or
  on DISK (one scratch file), copied into one of two device *slots* (a double buffer of the
  largest offloaded layer's size) before it runs;
* the offloaded layers, in model order ``o_0 .. o_{m-1}``, use slot ``k % 2``; the copy of
  ``o_{k+1}`` starts when ``o_k`` starts computing (its slot was last used by ``o_{k-1}``, done
  by then), on one background I/O thread, so it overlaps the compute of ``o_k`` and of the
  resident layers before ``o_{k+1}``. When ``o_{k+1}`` would need the slot ``o_k`` is using
  (``o_{m-1}`` -> ``o_0`` with ``m`` odd) its copy starts when ``o_k`` ends. ``o_0``'s copy for
  the next step overlaps the step's tail (``other_s``: lm_head, sampling, scheduling). With
  ``m <= 2`` every offloaded layer keeps its own slot and nothing is copied after the first step;
* a layer waits for its copy: its start is ``max(previous layer's end, copy end)``.

Placement (:func:`place_weights`, a documented greedy, not FlexGen's full linear-programming
search): everything resident when the budget holds all weights; otherwise the device holds the
non-layer weights, the two slots (sized by the largest layer, before knowing which are offloaded)
and as many layers as fit, smallest first, spread evenly over the depth (Bresenham) so each
offloaded layer's copy overlaps as much compute as possible; the offloaded layers go to the host
up to ``host_budget_bytes`` (also spread evenly), the rest to disk. Host is never slower than
disk and a resident layer never slower than an offloaded one, so with equal layers the greedy is
optimal for this model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

NUM_SLOTS = 2  # the device double buffer


class OffloadPolicyError(ValueError):
    """A placement that cannot be made (budget below the minimum, tiers full); says why."""


class WeightTier(enum.Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class OffloadCostModel:
    """Inputs of the placement. ``layer_bytes[i]`` / ``compute_s[i]``: decoder layer ``i``'s
    weight bytes and its compute time per step; ``fixed_bytes``: the weights outside the layers;
    ``other_s``: the step's compute outside the layers; bandwidths in bytes/s (host -> device,
    disk -> device); ``host_budget_bytes`` / ``disk_budget_bytes`` None = unbounded."""

    layer_bytes: tuple[int, ...]
    compute_s: tuple[float, ...]
    fixed_bytes: int
    device_budget_bytes: int
    host_bw: float
    disk_bw: float
    other_s: float = 0.0
    host_budget_bytes: int | None = None
    disk_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_bytes or len(self.layer_bytes) != len(self.compute_s):
            raise ValueError("layer_bytes and compute_s must be non-empty and of equal length")
        if min(self.layer_bytes) < 0 or self.fixed_bytes < 0 or self.device_budget_bytes < 0:
            raise ValueError("byte counts must be >= 0")
        if not (self.host_bw > 0 and self.disk_bw > 0):
            raise ValueError(f"bandwidths must be > 0, got host {self.host_bw}, disk {self.disk_bw}")
        if min(self.compute_s) < 0 or self.other_s < 0:
            raise ValueError("compute times must be >= 0")
        for name in ("host_budget_bytes", "disk_budget_bytes"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None")

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(self.layer_bytes)


@dataclass(frozen=True)
class WeightPlacement:
    """Each layer's tier, the device bytes the placement uses (non-layer weights, resident layers
    and slots: never above the budget), host and disk bytes, and the predicted step time."""

    tiers: tuple[WeightTier, ...]
    slot_bytes: int  # one slot's size (0: nothing offloaded)
    num_slots: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    predicted_step_s: float

    @property
    def offloaded(self) -> tuple[int, ...]:
        """The offloaded layers' indices, in model order."""
        return tuple(i for i, t in enumerate(self.tiers) if t is not WeightTier.DEVICE)


def min_device_budget(layer_bytes: Sequence[int], fixed_bytes: int) -> int:
    """The smallest device budget :func:`place_weights` accepts: the non-layer weights plus two
    slots of the largest layer."""
    return fixed_bytes + NUM_SLOTS * max(layer_bytes)


def spread(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1`` spread evenly (Bresenham): index ``i`` is chosen when
    ``floor((i+1)k/n) > floor(ik/n)``."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n}")
    return [i for i in range(n) if ((i + 1) * k) // n > (i * k) // n]


def fetch_s(tier: WeightTier, nbytes: int, host_bw: float, disk_bw: float) -> float:
    """Copy time of ``nbytes`` from ``tier`` to the device (0 for a resident layer)."""
    if tier is WeightTier.DEVICE:
        return 0.0
    return nbytes / (host_bw if tier is WeightTier.HOST else disk_bw)


@dataclass(frozen=True)
class KVStepCost:
    """The KV side of a step for :func:`predict_step_s`: the layers whose KV is off the device
    (model order), the time to read one such layer's held blocks into its staging buffer and to
    write the step's new rows back (bytes over the measured host bandwidth); for the layers in
    ``disk_layers`` (a subset of ``layers``: KV in the disk-backed pool) the same at the disk
    bandwidth, ``disk_read_s`` / ``disk_write_s``."""

    layers: tuple[int, ...] = ()
    read_s: float = 0.0
    write_s: float = 0.0
    disk_layers: tuple[int, ...] = ()
    disk_read_s: float = 0.0
    disk_write_s: float = 0.0

    def read_of(self, layer: int) -> float:
        return self.disk_read_s if layer in self.disk_layers else self.read_s

    def write_of(self, layer: int) -> float:
        return self.disk_write_s if layer in self.disk_layers else self.write_s


def predict_step_s(
    tiers: Sequence[WeightTier],
    layer_bytes: Sequence[int],
    compute_s: Sequence[float],
    host_bw: float,
    disk_bw: float,
    other_s: float = 0.0,
    kv: KVStepCost | None = None,
) -> float:
    """Steady-state time of one step under the model in the module docstring (the second of two
    simulated steps; the first starts cold, ``o_0``'s copy at time 0). With ``kv`` the offloaded
    KV's copies (:func:`place_kv`'s model) share the one I/O channel with the weight copies."""
    off = [i for i, t in enumerate(tiers) if t is not WeightTier.DEVICE]
    m = len(off)
    fetch = {i: fetch_s(tiers[i], layer_bytes[i], host_bw, disk_bw) for i in off}
    pos = {li: k for k, li in enumerate(off)}
    kvl = list(kv.layers) if kv is not None else []
    kvpos = {li: k for k, li in enumerate(kvl)}
    kv_ready: dict[int, float] = {}
    io_free = 0.0

    def io(duration: float, at: float) -> float:
        nonlocal io_free
        io_free = max(io_free, at) + duration
        return io_free

    ready: dict[int, float] = {}  # offloaded layer -> its copy's end
    loaded: dict[int, int] = {}  # slot -> offloaded layer it holds (copy submitted)

    def submit(li: int, at: float) -> None:
        nonlocal io_free
        slot = pos[li] % NUM_SLOTS
        if loaded.get(slot) == li:  # already there (m <= 2)
            ready[li] = min(ready.get(li, at), at)
            return
        start = max(io_free, at)
        io_free = start + fetch[li]
        ready[li] = io_free
        loaded[slot] = li

    t = 0.0
    if m:
        submit(off[0], 0.0)
    step_start = 0.0
    for _ in range(2):
        step_start = t
        if kvl:  # the first KV layer's read starts with the step (the held blocks are known then)
            assert kv is not None
            kv_ready[kvl[0]] = io(kv.read_of(kvl[0]), t)
        for i in range(len(tiers)):
            same_slot = False
            nxt = -1
            if i in pos:
                k = pos[i]
                t = max(t, ready[i])
                nxt = off[(k + 1) % m]
                same_slot = (k + 1) % m % NUM_SLOTS == k % NUM_SLOTS
                if not same_slot:
                    submit(nxt, t)
            if i in kvpos:
                assert kv is not None
                t = max(t, kv_ready[i])
                j = kvpos[i] + 1
                if j < len(kvl):
                    kv_ready[kvl[j]] = io(kv.read_of(kvl[j]), t)
            t += compute_s[i]
            if same_slot:
                submit(nxt, t)
            if i in kvpos:
                assert kv is not None
                io(kv.write_of(i), t)
        t += other_s
    return t - step_start


def place_weights(cost: OffloadCostModel) -> WeightPlacement:
    """The greedy placement of the module docstring. OffloadPolicyError when the device budget is
    below :func:`min_device_budget` or the host and disk budgets cannot take the rest."""
    lb = cost.layer_bytes
    n = len(lb)

    def result(tiers: list[WeightTier]) -> WeightPlacement:
        off = [i for i in range(n) if tiers[i] is not WeightTier.DEVICE]
        slot = max((lb[i] for i in off), default=0)
        nslots = min(len(off), NUM_SLOTS)
        dev = cost.fixed_bytes + sum(lb[i] for i in range(n) if tiers[i] is WeightTier.DEVICE)
        return WeightPlacement(
            tiers=tuple(tiers),
            slot_bytes=slot,
            num_slots=nslots,
            device_bytes=dev + slot * nslots,
            host_bytes=sum(lb[i] for i in off if tiers[i] is WeightTier.HOST),
            disk_bytes=sum(lb[i] for i in off if tiers[i] is WeightTier.DISK),
            predicted_step_s=predict_step_s(
                tiers, lb, cost.compute_s, cost.host_bw, cost.disk_bw, cost.other_s
            ),
        )

    if cost.device_budget_bytes >= cost.total_bytes:
        return result([WeightTier.DEVICE] * n)
    floor = min_device_budget(lb, cost.fixed_bytes)
    if cost.device_budget_bytes < floor:
        raise OffloadPolicyError(
            f"weight memory budget {cost.device_budget_bytes} bytes is below the minimum {floor} bytes "
            f"(weights outside the decoder layers {cost.fixed_bytes} + {NUM_SLOTS} layer buffers of "
            f"{max(lb)}); the model's weights total {cost.total_bytes} bytes"
        )
    avail = cost.device_budget_bytes - floor
    # how many layers fit (smallest first), then which: spread evenly over the depth
    count = 0
    used = 0
    for b in sorted(lb):
        if used + b > avail:
            break
        used += b
        count += 1
    resident = set(spread(n, count))
    while sum(lb[i] for i in resident) > avail:  # unequal layers: drop the largest chosen
        resident.remove(max(resident, key=lambda i: (lb[i], i)))
    for i in sorted(range(n), key=lambda i: lb[i]):  # and fill what is left
        if i not in resident and sum(lb[j] for j in resident) + lb[i] <= avail:
            resident.add(i)
    off = [i for i in range(n) if i not in resident]
    tiers = [WeightTier.DEVICE] * n
    host_cap = math.inf if cost.host_budget_bytes is None else cost.host_budget_bytes
    on_host: set[int] = set()
    if sum(lb[i] for i in off) <= host_cap:
        on_host = set(off)
    else:
        k = 0
        room = host_cap
        for b in sorted(lb[i] for i in off):
            if b > room:
                break
            room -= b
            k += 1
        on_host = {off[j] for j in spread(len(off), k)}
        while sum(lb[i] for i in on_host) > host_cap:
            on_host.remove(max(on_host, key=lambda i: (lb[i], i)))
    for i in off:
        tiers[i] = WeightTier.HOST if i in on_host else WeightTier.DISK
    disk = sum(lb[i] for i in off if i not in on_host)
    if cost.disk_budget_bytes is not None and disk > cost.disk_budget_bytes:
        raise OffloadPolicyError(
            f"the offloaded layers need {disk} bytes on disk beyond the host budget "
            f"({cost.host_budget_bytes} bytes) but the disk budget is {cost.disk_budget_bytes} bytes"
        )
    return result(tiers)


@dataclass(frozen=True)
class BatchChoice:
    """The batch size :func:`pick_offline_batch_size` chose, its predicted step time and
    throughput (sequences per second, one token each), and the best throughput it was compared to."""

    batch_size: int
    step_s: float
    seqs_per_s: float
    max_seqs_per_s: float


def pick_offline_batch_size(
    tiers: Sequence[WeightTier],
    layer_bytes: Sequence[int],
    compute_fixed_s: Sequence[float],
    compute_per_seq_s: Sequence[float],
    host_bw: float,
    disk_bw: float,
    max_batch: int,
    other_fixed_s: float = 0.0,
    other_per_seq_s: float = 0.0,
    efficiency: float = 0.9,
) -> BatchChoice:
    """Decode batch size for an offline (throughput) job over an offloaded model.

    Each layer's compute grows with the batch (``compute_fixed_s[i] + b * compute_per_seq_s[i]``)
    while its copy does not, so a larger batch hides more of the copies (FlexGen's point). Throughput
    ``b / predict_step_s(b)`` grows with ``b`` up to ``max_batch`` (what the KV pool and
    ``max_num_seqs`` allow, the caller's bound); this returns the *smallest* batch reaching
    ``efficiency`` of the throughput at ``max_batch`` (past it, a larger batch only adds latency)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")

    def step(b: int) -> float:
        c = [f + b * s for f, s in zip(compute_fixed_s, compute_per_seq_s, strict=True)]
        return predict_step_s(tiers, layer_bytes, c, host_bw, disk_bw, other_fixed_s + b * other_per_seq_s)

    best_s = step(max_batch)
    best = max_batch / best_s if best_s > 0 else math.inf
    for b in range(1, max_batch + 1):
        s = step(b)
        tput = b / s if s > 0 else math.inf
        if tput >= efficiency * best:
            return BatchChoice(b, s, tput, best)
    return BatchChoice(max_batch, best_s, best, best)  # pragma: no cover - b = max_batch qualifies


# ---------------------------------------------------------------------------- KV offloading
#
# FlexGen also offloads the KV cache. Here the unit is a decoder layer's whole KV pool (every
# block of that layer): the KV of the layers :func:`place_kv` picks lives off the device, in a
# host pool and, for the layers beyond the host budget, in a disk-backed pool (a memory-mapped
# file); the device holds the other layers' KV and two staging buffers. A staging buffer holds
# ``staging_blocks`` blocks: the most blocks the running batch can hold (the engine's bound:
# ``max_num_seqs`` sequences of at most ``max_model_len`` tokens), not the whole pool, so
# offloading ``k`` layers saves ``k`` layer pools less two staging buffers. Before an offloaded
# layer runs, the blocks the running requests hold are copied from its pool into its staging
# buffer, packed (the attention's block tables are renumbered for that layer), the next
# offloaded layer's while it computes (layer-ahead prefetch, on the same kind of background copy
# as the weights), and after it runs the step's new K/V rows are written back
# (:mod:`engine.kv_offload`). Per step an offloaded layer moves ``held blocks * block bytes per
# layer`` in and ``new tokens * token bytes per layer`` out, at the host or the disk bandwidth.


def staging_bound(
    num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int, lookahead: int = 0
) -> int:
    """The blocks one staging buffer holds (the engine's bound, :mod:`engine.kv_offload`): the
    most blocks one step's requests can use, ``max_num_seqs`` sequences of at most
    ``max_model_len + lookahead`` tokens each (``lookahead``: speculative tokens), plus one for
    a block table's padding entry; at most the pool's ``num_blocks``."""
    per_seq = math.ceil((max_model_len + lookahead) / block_size)
    return max(1, min(num_blocks, max_num_seqs * per_seq + 1))


@dataclass(frozen=True)
class KVPlacement:
    """Which layers' KV is off the device (model order; ``disk``: those of them in the
    disk-backed pool, the rest in the host pool), the pool's shape (``num_blocks`` blocks of
    ``block_bytes`` per layer), the staging buffers (``num_slots`` of ``staging_blocks`` blocks;
    None: the whole pool's), and the device / host / disk bytes the KV uses (device never above
    the budget it was placed for)."""

    num_layers: int
    num_blocks: int
    block_bytes: int  # one block of one layer (K and V)
    offloaded: tuple[int, ...]
    num_slots: int
    staging_blocks: int | None = None
    disk: tuple[int, ...] = ()

    @property
    def layer_bytes(self) -> int:
        """One layer's KV pool."""
        return self.num_blocks * self.block_bytes

    @property
    def staging(self) -> int:
        """Blocks one staging buffer holds."""
        return self.num_blocks if self.staging_blocks is None else self.staging_blocks

    @property
    def staging_bytes(self) -> int:
        """One staging buffer."""
        return self.staging * self.block_bytes

    @property
    def device_bytes(self) -> int:
        return (
            self.num_layers - len(self.offloaded)
        ) * self.layer_bytes + self.num_slots * self.staging_bytes

    @property
    def host_bytes(self) -> int:
        return (len(self.offloaded) - len(self.disk)) * self.layer_bytes

    @property
    def disk_bytes(self) -> int:
        return len(self.disk) * self.layer_bytes

    @property
    def fraction(self) -> float:
        """The share of the KV pool's bytes off the device."""
        return len(self.offloaded) / self.num_layers


def kv_device_bytes(num_layers: int, layer_bytes: int, staging_bytes: int, k: int) -> int:
    """Device bytes of the KV with ``k`` layers offloaded: the resident layers' pools and
    ``min(k, 2)`` staging buffers of ``staging_bytes``."""
    return (num_layers - k) * layer_bytes + min(k, NUM_SLOTS) * staging_bytes


def min_kv_device_budget(num_layers: int, layer_bytes: int, staging_bytes: int | None = None) -> int:
    """The smallest KV device budget :func:`place_kv` accepts: two staging buffers
    (``staging_bytes``; None: a whole layer's pool), or the whole pool when that is less."""
    sb = layer_bytes if staging_bytes is None else staging_bytes
    return min(min(NUM_SLOTS, num_layers) * sb, num_layers * layer_bytes)


def disk_layers(offloaded: Sequence[int], num_host: int) -> tuple[int, ...]:
    """Which of ``offloaded`` (model order) go to the disk-backed pool when the host pool holds
    ``num_host`` layers: ``len(offloaded) - num_host`` of them spread over the depth, the first
    offloaded layer (whose read cannot overlap a previous layer's compute) last."""
    off = list(offloaded)
    d = max(0, len(off) - max(0, num_host))
    if d == 0:
        return ()
    if d == len(off):
        return tuple(off)
    rest = off[1:]
    return tuple(rest[i] for i in spread(len(rest), d))


def kv_placement(
    num_layers: int,
    num_blocks: int,
    block_bytes: int,
    offloaded: Sequence[int],
    staging_blocks: int | None = None,
    disk: Sequence[int] = (),
) -> KVPlacement:
    """The placement with exactly ``offloaded`` layers' KV off the device, ``disk`` of them in the
    disk-backed pool, staging buffers of ``staging_blocks`` blocks (tests, benches)."""
    off = tuple(sorted(set(offloaded)))
    if off and not (off[0] >= 0 and off[-1] < num_layers):
        raise ValueError(f"offloaded KV layers {off} out of range for {num_layers} layers")
    if num_layers < 1 or num_blocks < 1 or block_bytes < 1:
        raise ValueError(f"need >= 1 layer, block and byte, got {num_layers}, {num_blocks}, {block_bytes}")
    dk = tuple(sorted(set(disk)))
    if not set(dk) <= set(off):
        raise ValueError(f"disk KV layers {dk} are not all offloaded ({off})")
    if staging_blocks is not None and not 1 <= staging_blocks <= num_blocks:
        raise ValueError(f"staging_blocks must be in [1, {num_blocks}], got {staging_blocks}")
    sb = None if staging_blocks == num_blocks else staging_blocks
    return KVPlacement(num_layers, num_blocks, block_bytes, off, min(len(off), NUM_SLOTS), sb, dk)


def place_kv(
    num_layers: int,
    num_blocks: int,
    block_bytes: int,
    device_budget_bytes: int,
    staging_blocks: int | None = None,
    host_budget_bytes: int | None = None,
) -> KVPlacement:
    """The KV placement for ``device_budget_bytes``: everything on the device when the pool fits;
    else the fewest offloaded layers whose device bytes (resident layers + two staging buffers of
    ``staging_blocks`` blocks, None: a layer's pool) fit, spread evenly over the depth
    (:func:`spread`: layer 0, whose copy cannot overlap a previous layer, is the last chosen). A
    resident layer never moves a byte, so fewer offloaded layers is never slower under
    :func:`predict_step_s`. Of the offloaded layers, as many as ``host_budget_bytes`` holds
    (None: no limit) stay in the host pool, the others go to the disk-backed pool
    (:func:`disk_layers`). OffloadPolicyError below :func:`min_kv_device_budget`."""
    lb = num_blocks * block_bytes
    if device_budget_bytes >= num_layers * lb:
        return kv_placement(num_layers, num_blocks, block_bytes, (), staging_blocks)
    stb = lb if staging_blocks is None else staging_blocks * block_bytes
    floor = min_kv_device_budget(num_layers, lb, stb)
    if device_budget_bytes < floor:
        raise OffloadPolicyError(
            f"KV memory budget {device_budget_bytes} bytes is below the minimum {floor} bytes "
            f"({NUM_SLOTS} staging buffers of {stb} bytes each, {stb // block_bytes} blocks); the "
            f"whole pool needs {num_layers * lb} bytes"
        )
    k = next(
        k for k in range(1, num_layers + 1) if kv_device_bytes(num_layers, lb, stb, k) <= device_budget_bytes
    )
    off = spread(num_layers, k)
    nh = k if host_budget_bytes is None else host_budget_bytes // lb
    return kv_placement(num_layers, num_blocks, block_bytes, off, staging_blocks, disk_layers(off, nh))


def kv_step_cost(
    placement: KVPlacement,
    held_blocks: int,
    new_tokens: int,
    block_size: int,
    host_bw: float,
    disk_bw: float | None = None,
) -> KVStepCost:
    """The KV copies of a step whose requests hold ``held_blocks`` blocks and write
    ``new_tokens`` tokens (``block_size`` tokens a block), at ``host_bw`` bytes/s (the disk-backed
    layers at ``disk_bw``, needed when the placement has any): per offloaded layer, read
    ``held_blocks * block_bytes``, write ``new_tokens * block_bytes / block_size``."""
    if host_bw <= 0:
        raise ValueError(f"host_bw must be > 0, got {host_bw}")
    if placement.disk and (disk_bw is None or disk_bw <= 0):
        raise ValueError(f"disk-backed KV layers {placement.disk} need disk_bw > 0, got {disk_bw}")
    b = placement.block_bytes
    rd, wr = held_blocks * b, new_tokens * b / block_size
    dbw = disk_bw if disk_bw else host_bw
    return KVStepCost(placement.offloaded, rd / host_bw, wr / host_bw, placement.disk, rd / dbw, wr / dbw)


def kv_step_bytes(placement: KVPlacement, held_blocks: int, new_tokens: int, block_size: int) -> int:
    """Bytes the KV offload moves in one such step (all offloaded layers, both directions)."""
    per_layer = held_blocks * placement.block_bytes + new_tokens * placement.block_bytes // block_size
    return len(placement.offloaded) * per_layer


@dataclass(frozen=True)
class MemorySplit:
    """:func:`split_device_budget`'s choice: the weight placement, the KV placement, the device
    budget each got, and the predicted step time of the pair."""

    weights: WeightPlacement
    kv: KVPlacement
    weight_budget_bytes: int
    kv_budget_bytes: int
    predicted_step_s: float


def split_device_budget(
    cost: OffloadCostModel,
    kv_num_blocks: int,
    kv_block_bytes: int,
    held_blocks: int,
    new_tokens: int,
    block_size: int,
    staging_blocks: int | None = None,
    kv_host_budget_bytes: int | None = None,
) -> MemorySplit:
    """Split ``cost.device_budget_bytes`` (weights + KV) between the weights and the KV pool: for
    each count ``k`` of layers whose KV is offloaded (0..L), the KV takes
    :func:`kv_device_bytes` (staging buffers of ``staging_blocks`` blocks; None: a layer's pool),
    the weights :func:`place_weights` of the rest; the pair with the smallest
    :func:`predict_step_s` (KV priced by :func:`kv_step_cost` for ``held_blocks`` / ``new_tokens``
    a step, the host-pool layers at ``cost.host_bw``, those beyond ``kv_host_budget_bytes`` on
    disk at ``cost.disk_bw``) wins, ties to the fewer offloaded KV layers. OffloadPolicyError when
    no ``k`` leaves the weights their minimum."""
    n = len(cost.layer_bytes)
    lb = kv_num_blocks * kv_block_bytes
    best: MemorySplit | None = None
    for k in range(n + 1):
        off = spread(n, k)
        nh = k if kv_host_budget_bytes is None else kv_host_budget_bytes // lb
        kvp = kv_placement(n, kv_num_blocks, kv_block_bytes, off, staging_blocks, disk_layers(off, nh))
        wb = cost.device_budget_bytes - kvp.device_bytes
        if wb < 0:
            continue
        try:
            wp = place_weights(replace(cost, device_budget_bytes=wb))
        except OffloadPolicyError:
            continue
        kvc = (
            kv_step_cost(kvp, held_blocks, new_tokens, block_size, cost.host_bw, cost.disk_bw) if k else None
        )
        pred = predict_step_s(
            wp.tiers, cost.layer_bytes, cost.compute_s, cost.host_bw, cost.disk_bw, cost.other_s, kv=kvc
        )
        if best is None or pred < best.predicted_step_s:
            best = MemorySplit(wp, kvp, wb, kvp.device_bytes, pred)
    if best is None:
        stb = None if staging_blocks is None else staging_blocks * kv_block_bytes
        need = min_device_budget(cost.layer_bytes, cost.fixed_bytes) + min_kv_device_budget(n, lb, stb)
        raise OffloadPolicyError(
            f"device memory budget {cost.device_budget_bytes} bytes is below the minimum {need} bytes for "
            f"weights and KV (the weights' minimum plus {NUM_SLOTS} KV staging buffers)"
        )
    return best
