"""Hand-built cluster states for the pure router policies' unit tests (one copy, shared by
test_adapter_cost, test_policy_adapter_choice and test_policy_goodput).

The latency model is exact arithmetic: prefill 1 ms per new token, decode step 10 ms + 1 ms per
request in the batch, transfer 1000 bytes/token at ``bw`` bytes/s. A snapshot's cached prefix is
the first ``cached`` of :data:`KEYS`; a worker that serves adapters (``adapter_slots`` > 0)
reports the measured load times :data:`SLOT` (host -> slot copy) and :data:`DISK` (disk -> host
read) unless the caller gives others.
"""

from __future__ import annotations

from router.policy import InstanceRole, InstanceSnapshot, LinearLatency, Placement, Rejection

P, D, M = InstanceRole.PREFILL, InstanceRole.DECODE, InstanceRole.MIXED
MS = 1e-3
KEYS = [bytes([i]) * 8 for i in range(64)]
SLOT, DISK = 10 * MS, 200 * MS


def lat(bw: float = 1e9) -> LinearLatency:
    return LinearLatency(
        kv_bytes_per_token=1000,
        prefill_base_s=0.0,
        prefill_per_token_s=MS,
        prefill_per_token_ctx_s=0.0,
        decode_base_s=10 * MS,
        decode_per_seq_s=MS,
        decode_per_ctx_token_s=0.0,
        transfer_latency_s=0.0,
        transfer_bandwidth=bw,
    )


def snap(
    i: str,
    role: InstanceRole = M,
    q: int = 0,
    running: int = 0,
    free: int = 1000,
    cached: int = 0,
    slot=(),  # noqa: ANN001 - any iterable of adapter names
    host=(),  # noqa: ANN001
    adapter_slots: int = 0,
    **kw,
) -> InstanceSnapshot:
    """Instance ``i`` of ``role``: ``q`` queued prompt tokens, ``running`` requests, ``free`` of
    1000 blocks, the first ``cached`` KEYS cached, adapters ``slot`` in engine slots and ``host``
    in host memory; any other InstanceSnapshot field by keyword."""
    fields: dict = dict(
        queued_tokens=q,
        running_requests=running,
        free_blocks=free,
        total_blocks=1000,
        cached=frozenset(KEYS[:cached]),
        adapters_in_slot=frozenset(slot),
        adapters_in_host=frozenset(host),
        adapter_slots=adapter_slots,
    )
    if adapter_slots > 0:
        fields.update(adapter_slot_load_s=SLOT, adapter_disk_load_s=DISK)
    fields.update(kw)
    return InstanceSnapshot(i, role, **fields)


def placed(d: Placement | Rejection) -> Placement:
    assert isinstance(d, Placement), d
    return d


def rejected(d: Placement | Rejection) -> Rejection:
    assert isinstance(d, Rejection), d
    return d
