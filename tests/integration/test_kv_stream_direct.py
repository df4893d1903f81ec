"""Chunk-wise KV streaming (``--kv-stream``) for direct token streams (the SDK's default): the
streamed Decode carries the direct grant, the decode worker assembles the streamed KV and then
streams the tokens to the client itself (router.lifecycle.direct_legs
``DirectLegs.start_streamed_decode``, router.lifecycle.grpc_stream_legs ``DirectGrantLeg``).

The in-process cluster of tests/integration/kv_stream_cluster.py (a KV store node, two
prefill and two decode workers with the real servicers, the tiny Llama, 32-token prefill chunks),
here with DirectStream on the decode workers and direct streams on its routers (store, grpc),
plus a third router with ``kv_stream`` off (the whole-KV direct handoff):

* outputs (tokens and text, greedy and seeded) equal the engine run whole and the whole-KV direct
  handoff; every streamed request's KV went by a stream (the prefill workers opened one each) and
  its tokens by the decode worker's DirectStream (served direct, the client attached);
* a client cancelled mid-prefill leaves nothing: no engine block, no store lease, no stream in a
  prefill worker's registry, no direct slot on a decode worker;
* a streamed direct request live-migrated mid-way to the other decode worker (the client resumes
  and streams from the destination) has output identical to the engine's;
* a decode worker killed after the redirect (the client streams from it): the client resumes at
  the router, the rest relayed, output identical;
* last (it stops a prefill worker): a prefill worker killed mid-stream is re-dispatched, the
  request streamed again and served direct, output identical.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from router.lifecycle.direct_legs import DirectLegs
from router.lifecycle.states import State
from router.lifecycle.stream_mode import KVStreamMode
from router.service import RouterConfig
from tests.integration.kv_stream_cluster import (
    CALL_S,
    GREEDY,
    SEEDED,
    Cluster,
    Slow,
    check_cancel_mid_prefill,
    model_path,  # noqa: F401 - the module's tiny model (a fixture)
    redispatches,
    seeded_prompt,
    slowed,
    slowly_streaming,
    whole,  # noqa: F401 - the engine run whole (a fixture)
)
from tests.polling import wait_for

MODES = [KVStreamMode.STORE, KVStreamMode.GRPC]


class _DirectCluster(Cluster):
    """The kv-stream cluster with direct streams, a whole-KV direct router beside the streamed
    ones, and a count of the requests each decode worker served direct (``served``)."""

    def __init__(self, path) -> None:
        super().__init__(path, direct_streams=True)
        self.served: dict[str, list[str]] = {n: [] for n in self.decode}
        self.served_resumed: dict[str, list[str]] = {n: [] for n in self.decode}  # migrated in, direct
        for n, d in self.decode.items():
            d.direct.serve = self._counting(self.served[n], d.direct.serve)
            d.direct.serve_resumed = self._counting(self.served_resumed[n], d.direct.serve_resumed)
        self.slow_decode = {n: Slow(self.states[n].engine) for n in self.decode}
        cfg = RouterConfig(model_path=str(path), model_id="llama", max_redispatches=2, direct_streams=True)
        self.add_router(KVStreamMode.OFF, cfg, CollectorRegistry())

    @staticmethod
    def _counting(log: list[str], serve):
        def counted(rid_or_req, *a, **kw):
            log.append(getattr(rid_or_req, "request_id", rid_or_req))
            return serve(rid_or_req, *a, **kw)

        return counted

    def num_served(self) -> int:
        return sum(len(v) for v in self.served.values())

    def direct_slots(self) -> list[str]:
        """Direct requests still registered on a decode worker still running."""
        return [rid for n, d in self.decode.items() if n not in self.stopped for rid in d.direct._slots]

    def wait_clean(self, timeout_s: float = 30.0) -> None:
        super().wait_clean(timeout_s)
        wait_for(lambda: not self.direct_slots(), timeout_s, "no direct slot left on a decode worker")


@pytest.fixture(scope="module")
def cluster(model_path):  # noqa: F811 - the fixture
    cl = _DirectCluster(model_path)
    yield cl
    cl.stop()


def _collect(c: Client, prompt, params) -> tuple[list[int], str, str]:
    toks: list[int] = []
    text, reason = "", ""
    for ch in c.generate(prompt, params, direct=True):
        toks += ch.token_ids
        text += ch.text
        if ch.finish is not None:
            reason = ch.finish.reason
    return toks, text, reason


@pytest.mark.parametrize("mode", MODES, ids=["store", "grpc"])
def test_direct_streamed_equals_engine_and_whole_kv_handoff(cluster, whole, mode) -> None:  # noqa: F811
    prompts = [seeded_prompt(200, 11), seeded_prompt(130, 12), seeded_prompt(77, 13)]
    params = [GREEDY, SEEDED, GREEDY]
    refs = whole.generate(prompts, params)

    def run(m: KVStreamMode) -> tuple[list, set[str]]:
        with Client(cluster.address(m), timeout=CALL_S) as c, ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda i: _collect(c, prompts[i], params[i]), range(3)))
            return got, set(c._direct_mux._conns)

    opened, served = cluster.streams_opened(), cluster.num_served()
    streamed, attached = run(mode)
    assert cluster.streams_opened() == opened + 3  # every handoff went by a stream
    assert cluster.num_served() == served + 3  # and every request's tokens went direct
    assert attached and attached <= {st.address for n, st in cluster.states.items() if n in cluster.decode}
    opened, served = cluster.streams_opened(), cluster.num_served()
    handed, _ = run(KVStreamMode.OFF)  # the whole-KV direct handoff
    assert cluster.streams_opened() == opened and cluster.num_served() == served + 3
    for ref, s, h in zip(refs, streamed, handed, strict=True):
        assert s[0] == h[0] == ref.token_ids
        assert s[1] == h[1] == ref.text
        assert s[2] == h[2] == "length"
    cluster.wait_clean()


def test_client_cancelled_mid_prefill_leaves_nothing(cluster) -> None:
    check_cancel_mid_prefill(cluster, seeded_prompt(300, 14), GREEDY, direct_stream=True)


def test_streamed_direct_request_migrated_mid_way_is_identical(cluster, whole) -> None:  # noqa: F811
    prompt = seeded_prompt(120, 17)
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=3, ignore_eos=True)
    ref = whole.generate([prompt], [params])[0]
    mode = KVStreamMode.STORE
    svc = cluster.routers[mode][0]
    opened, served = cluster.streams_opened(), cluster.num_served()
    with (
        slowed(cluster.slow_decode.values(), 0.02),
        Client(cluster.address(mode), timeout=CALL_S) as c,
        ThreadPoolExecutor(1) as ex,
    ):
        fut = ex.submit(_collect, c, prompt, params)
        deadline = time.monotonic() + CALL_S
        while True:  # decoding, its client redirected to the decode worker
            assert not fut.done() and time.monotonic() < deadline, "never decoded directly"
            running = list(svc.running().values())
            if running and running[0].state is State.DECODING:
                legs = running[0].legs
                assert isinstance(legs, DirectLegs)
                if legs._direct and legs._redirect is not None:
                    break
            time.sleep(0.002)
        src = running[0].m.decode_id
        dst = next(n for n in cluster.decode if n != src)
        outcome = asyncio.run_coroutine_threadsafe(
            _migrate(svc, running[0].m.request_id, dst), cluster.routers[mode][1].loop
        ).result(CALL_S)
        toks, text, reason = fut.result(CALL_S)
    assert outcome.migrated, outcome
    assert toks == ref.token_ids and text == ref.text and reason == "length"
    assert cluster.streams_opened() == opened + 1 and cluster.num_served() == served + 1
    # the client streamed the rest straight from the destination (a direct ResumeStream there)
    assert cluster.served_resumed[dst] == [running[0].m.request_id]
    cluster.wait_clean()


async def _migrate(svc, rid: str, dst: str):
    return await svc.migrate(rid, dst)


def test_decode_worker_killed_after_the_redirect_resumes_identically(cluster, whole) -> None:  # noqa: F811
    """Stops a decode worker for good (the next test keeps one of each)."""
    prompt = seeded_prompt(150, 15)
    params = SEEDED
    ref = whole.generate([prompt], [params])[0]
    mode = KVStreamMode.GRPC
    svc = cluster.routers[mode][0]
    before = redispatches(cluster, mode, "decode")
    opened = cluster.streams_opened()
    for s in cluster.slow_decode.values():
        s.delay_s = 0.05
    victim = None
    toks: list[int] = []
    text = ""
    try:
        with Client(cluster.address(mode), timeout=CALL_S) as c:
            for ch in c.generate(prompt, params, direct=True):
                toks += ch.token_ids
                text += ch.text
                if victim is None and len(toks) >= 4:  # the client streams from its decode worker
                    (drv,) = svc.running().values()
                    assert drv.state is State.DECODING
                    victim = drv.m.decode_id
                    assert victim in {n for n, rids in cluster.served.items() if rids}
                    cluster.kill(victim)
                    for s in cluster.slow_decode.values():
                        s.delay_s = 0.0
    finally:
        for s in cluster.slow_decode.values():
            s.delay_s = 0.0
    assert victim is not None
    assert toks == ref.token_ids and text == ref.text
    assert redispatches(cluster, mode, "decode") == before + 1
    assert cluster.streams_opened() == opened + 2  # streamed first, streamed again after the loss
    cluster.wait_clean()


def test_prefill_worker_killed_mid_stream_is_redispatched(cluster, whole) -> None:  # noqa: F811
    """Last in the module: it stops a prefill worker for good."""
    prompt = seeded_prompt(300, 16)
    ref = whole.generate([prompt], [SEEDED])[0]
    mode = KVStreamMode.GRPC
    before = redispatches(cluster, mode, "prefill")
    served = cluster.num_served()
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values()):
            fut = ex.submit(_collect, c, prompt, SEEDED)
            victim, _ = slowly_streaming(cluster, fut, mode)
            cluster.kill(victim)
        toks, text, _ = fut.result(CALL_S)
    assert toks == ref.token_ids and text == ref.text
    assert redispatches(cluster, mode, "prefill") == before + 1
    assert cluster.num_served() == served + 1  # the re-dispatched request still went direct
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()
