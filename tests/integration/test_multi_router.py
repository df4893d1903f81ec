"""No single router (issue #12 section 4), over real processes on loopback with a tiny model.

One embedded cluster (store, two routers, 1 prefill + 2 decode workers; a tiny random-weight
Llama with SmolLM2's tokenizer) serves the module; every worker registers with both routers.
An SDK client given both addresses runs 30 concurrent greedy streams and the first router is
SIGKILLed while they run: every request succeeds with the engine's own output (streams cut off
mid-way resume on the other router without repeated tokens), the surviving router never loses a
worker, new requests go on, and the launcher's supervisor restarts the killed router on its port,
where the workers register again.
"""

from __future__ import annotations

import logging
import threading

import pytest

from bench.concurrency import WorkerWatch, prompt_ids, registered_workers, tiny_model
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from tests.integration.clusters import paced_workers
from tests.polling import wait_for

STREAMS = 30
MAX_TOKENS = 48
PROMPT_LEN = 12
ALL_WORKERS = {"prefill": 1, "decode": 2}
MIN_STEP_S = 0.01  # each worker step lasts at least this long (tests.integration.clusters.paced_workers)
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-multi-router"))


@pytest.fixture(scope="module")
def cluster(model):
    # paced workers: on the native kernels the tiny model finished all 30 streams before the kill
    # could land mid-way (CI), so no stream would test the resume
    with paced_workers(MIN_STEP_S):
        cl = launch(ClusterSpec(model_path=str(model), num_prefill=1, num_decode=2, num_routers=2))
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    """The engine's own greedy output of each stream's prompt, run whole."""
    whole = LLMEngine.from_pretrained(str(model), EngineConfig(num_kv_blocks=512))
    try:
        outs = whole.generate([prompt_ids(i, PROMPT_LEN) for i in range(STREAMS + 1)], PARAMS)
        return [list(o.token_ids) for o in outs]
    finally:
        whole.close()


def _workers(cl: LocalCluster, router: str) -> dict[str, int]:
    return registered_workers(cl.metrics[router])


def test_workers_register_with_every_router(cluster) -> None:
    assert len(cluster.router_addresses) == 2 and cluster.router_names == ["router", "router-1"]
    for name in cluster.router_names:
        assert _workers(cluster, name) == ALL_WORKERS, name
    assert cluster.dead() == []


class _Streams:
    """STREAMS greedy streams on threads through one client; per stream: tokens so far, the router
    serving it now, and the outcome."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.tokens = [[] for _ in range(STREAMS)]  # type: list[list[int]]
        self.router = [""] * STREAMS
        self.errors: dict[int, Exception] = {}
        self.started = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(STREAMS)]

    def _run(self, i: int) -> None:
        try:
            stream = self.client.generate(prompt_ids(i, PROMPT_LEN), PARAMS, request_id=f"multi-{i}")
            for c in stream:
                with self.lock:
                    self.tokens[i] += c.token_ids
                    self.router[i] = stream.router
        except Exception as e:  # noqa: BLE001 - recorded, asserted below
            with self.lock:
                self.errors[i] = e

    def snapshot(self) -> list[tuple[int, str]]:
        with self.lock:
            return [(len(t), r) for t, r in zip(self.tokens, self.router, strict=True)]


def test_router_killed_under_load_every_request_succeeds(cluster, reference, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pdserve.client")
    victim, survivor = cluster.router_names
    victim_address = cluster.router_addresses[0]
    restarts_before = len(cluster.router_restarts)
    with (
        Client(cluster.router_addresses, timeout=120) as client,
        WorkerWatch(cluster.metrics[survivor]) as watch,
    ):
        s = _Streams(client)
        for t in s.threads:
            t.start()
        # kill once some stream on the victim is part-way: it must resume on the survivor
        wait_for(
            lambda: any(r == victim_address and 0 < n < MAX_TOKENS // 2 for n, r in s.snapshot()),
            120,
            "a stream part-way on the first router",
            interval_s=0.01,
        )
        cluster.procs[victim].kill()  # SIGKILL
        at_kill = s.snapshot()
        # a new request goes on at once, on the survivor (the dead router is skipped)
        done = client.complete(prompt_ids(STREAMS, PROMPT_LEN), PARAMS)
        assert done.token_ids == reference[STREAMS]
        for t in s.threads:
            t.join(120)
        assert not any(t.is_alive() for t in s.threads)
    assert not s.errors, f"{len(s.errors)} of {STREAMS} failed, e.g. {next(iter(s.errors.values()))!r}"
    for i in range(STREAMS):
        assert s.tokens[i] == reference[i], f"stream {i} differs from the engine's own output"
    cut = [i for i, (n, r) in enumerate(at_kill) if r == victim_address and 0 < n < MAX_TOKENS]
    assert cut, "no stream was part-way on the killed router"
    assert all(s.router[i] == cluster.router_addresses[1] for i in cut)  # resumed on the survivor
    assert any("unavailable: request goes on at the next router" in r.getMessage() for r in caplog.records)
    assert watch.samples > 0 and watch.minimum == ALL_WORKERS, watch.minimum  # survivor lost no worker
    # the supervisor restarts the killed router on its port; the workers register with it again
    wait_for(lambda: len(cluster.router_restarts) > restarts_before, 120, "the killed router restarted")
    assert cluster.router_restarts[-1][0] == victim
    assert cluster.router_addresses[0] == victim_address
    wait_for(
        lambda: _workers(cluster, victim) == ALL_WORKERS, 60, "workers registered with the restarted router"
    )
    with Client(victim_address, timeout=120) as direct:  # the restarted router places requests itself
        assert direct.complete(prompt_ids(0, PROMPT_LEN), PARAMS).token_ids == reference[0]
    assert cluster.dead() == []
