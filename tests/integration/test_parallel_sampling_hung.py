"""A parallel-sampling group on a hung (SIGSTOPped, not dead) decode worker, over real processes
on loopback with the real SmolLM2-135M model: only the router's progress deadline notices it;
the group is re-dispatched whole to the other decode worker and every choice still equals the
engine run whole; the stopped worker is quarantined, and once continued it frees every block.

The cluster of test_hung_worker.py (1 prefill, 2 decode, short deadlines, long heartbeat timeout)
serves the module.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from tests.integration import test_hung_worker as base
from tests.integration.test_hung_worker import _quarantined, _redispatches, _stopped, _wait, _wait_baseline
from tests.workers import worker_stats

cluster, whole = base.cluster, base.whole  # module fixtures reused

PARAMS = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True, n=3)
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def test_group_on_a_stopped_decode_worker_is_redispatched_exactly(cluster, whole):
    ref = whole.engine.generate_choices(PROMPT, PARAMS)
    before = _redispatches(cluster, "decode")
    ids: dict[int, list[int]] = {0: [], 1: [], 2: []}
    fins = {}
    victim = None
    with Client(cluster.router_address, timeout=300) as c, contextlib.ExitStack() as stopped:
        for ch in c.generate(PROMPT, PARAMS):
            ids[ch.choice_index] += ch.token_ids
            if ch.finish is not None:
                fins[ch.choice_index] = ch.finish
            if victim is None and sum(map(len, ids.values())) >= 6:
                running = {w: worker_stats(cluster.workers[w]).num_running for w in ("decode-0", "decode-1")}
                victim = next(w for w, n in running.items() if n == 3)  # the whole group is there
                stopped.enter_context(_stopped(cluster, victim))  # continued when the block ends
        assert victim is not None and sorted(fins) == [0, 1, 2]
        for i in range(3):
            assert ids[i] == ref[i].token_ids, i
        assert _redispatches(cluster, "decode") == before + 1
        assert _quarantined(cluster, "decode") >= 1
    _wait(lambda: _quarantined(cluster, "decode") == 0, "the continued worker answers its probe")
    _wait_baseline(cluster, ("decode-0", "decode-1"))
    # served again by either worker, same choices
    with Client(cluster.router_address, timeout=300) as c:
        again = c.complete_choices(PROMPT, replace(PARAMS, max_tokens=8))
    assert [a.token_ids for a in again] == [
        r.token_ids for r in whole.engine.generate_choices(PROMPT, replace(PARAMS, max_tokens=8))
    ]
