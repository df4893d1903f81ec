"""Live migration over a real gloo process group (MIGRATION_TRANSPORT_DIST), end to end over real
processes on loopback: a router with ``--migration-transport dist`` drains a decode worker through
its Admin service while its streams run; each migration's stages wait in the source decode
worker's outbox and go to the destination over gloo (KVPeer.PushKV on the source + a receive on
the destination), as in the prefill -> decode direct handoff that the same cluster uses.

One cluster (store, router, 1 prefill + 2 decode workers in one gloo group; the real SmolLM2-135M;
relayed token streams) serves the module. The store must see no block put: every KV moves over gloo.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.drain_cli import drain_via_routers
from pdserve.launcher import launch
from tests.integration.clusters import gloo_spec, logged, store_node_stats
from tests.prompts import PROMPTS

PARAMS = [
    SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=120, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True),
] * 2


@pytest.fixture(scope="module")
def cluster(smollm_path):
    # no progress deadline: on a loaded 2-core host a decode step can take seconds, and a
    # stalled-worker verdict would re-dispatch instead of testing the migration
    cl = launch(
        gloo_spec(
            smollm_path, "--migration-transport", "dist", "--progress-timeout-s", "0", direct_streams=False
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def reference(smollm_path):
    """The unmigrated outputs (computed before the cluster starts: less CPU contention)."""
    whole = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512))
    return whole.generate(PROMPTS[: len(PARAMS)], PARAMS)


def test_drain_migrates_over_gloo_and_streams_equal_the_whole_engine(reference, cluster):
    prompts = PROMPTS[: len(PARAMS)]
    ref = reference
    first: dict[int, float] = {}
    with Client(cluster.router_address, timeout=300) as client, cf.ThreadPoolExecutor(len(prompts)) as ex:

        def run(i: int):
            toks: list[int] = []
            for chunk in client.generate(prompts[i], PARAMS[i], direct=False):
                toks.extend(chunk.token_ids)
                first.setdefault(i, time.monotonic())
            return toks

        futs = [ex.submit(run, i) for i in range(len(prompts))]
        deadline = time.monotonic() + 240
        while len(first) < len(prompts):  # every stream decoding
            assert time.monotonic() < deadline, "the streams did not start"
            assert not any(f.done() and f.exception() for f in futs), [
                f.exception() for f in futs if f.done()
            ]
            time.sleep(0.05)
        report = drain_via_routers([cluster.router_address], "decode-0", timeout_s=240, poll_s=0.1)
        got = [f.result(timeout=300) for f in futs]
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g == r.token_ids, (i, PARAMS[i])
    assert report.get("drained", True), report
    migrated = [r for r in logged(cluster, "decode-0", "migrate out") if r.get("result") == "MIGRATED"]
    assert migrated, "decode-0 migrated nothing out"
    # the stages went over gloo: decode-0's KVPeer pushed them to decode-1's rank
    pushes = logged(cluster, "decode-0", "direct push")
    assert pushes and all(int(p["dst_rank"]) == 2 for p in pushes), pushes
    node = store_node_stats(cluster)
    assert node.puts == 0 and node.num_leases == 0, node  # nothing through the store
