"""Tensor-parallel workers end to end: a launched cluster whose prefill and decode workers each
split SmolLM2-135M over 3 processes (``--tp 3``, gloo on CPU) serves concurrent requests with
the whole engine's greedy output; each worker really runs 2 follower processes; a worker whose rank
dies exits with status 1; stopping the cluster leaves no rank behind."""

from __future__ import annotations

import concurrent.futures as cf
import time

import psutil
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, launch
from tests.prompts import PROMPTS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_tp3_workers_serve_the_whole_engines_output_and_leave_nothing_behind(smollm_path) -> None:
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=256,
            store_capacity_blocks=512,
            worker_args=("--tp", "3"),
        )
    )
    followers: list[psutil.Process] = []
    ref_pool = cf.ThreadPoolExecutor(1)
    try:
        for wid in ("prefill-0", "decode-0"):
            kids = psutil.Process(cl.procs[wid].pid).children()
            tp_kids = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]  # not the resource tracker
            assert len(tp_kids) == 2, (wid, [k.cmdline() for k in kids])
            followers += tp_kids
        prompts = PROMPTS[:8]
        with Client(cl.router_address, timeout=300) as c, cf.ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda p: c.complete(p, GREEDY), prompts))
        # a rank of the prefill worker dies: the worker exits non-zero (to be restarted whole);
        # meanwhile (mostly waiting) the whole engine computes the reference outputs
        followers[0].kill()
        refs = ref_pool.submit(_whole_engine_tokens, smollm_path, prompts)
        deadline = time.monotonic() + 30
        while cl.procs["prefill-0"].poll() is None:
            assert time.monotonic() < deadline, "the prefill worker kept running without its rank 1"
            time.sleep(0.2)
        assert cl.procs["prefill-0"].returncode == 1
    finally:
        cl.stop()
        ref_pool.shutdown(wait=True)
    for p, r, g in zip(prompts, refs.result(), got, strict=True):
        assert g.token_ids == r, p
    deadline = time.monotonic() + 20
    while any(f.is_running() and f.status() != psutil.STATUS_ZOMBIE for f in followers):
        assert time.monotonic() < deadline, "tensor-parallel followers outlived their workers"
        time.sleep(0.2)


def _whole_engine_tokens(model, prompts) -> list:
    """The whole (single-process) engine's greedy token ids of ``prompts``."""
    whole = LLMEngine.from_pretrained(model, EngineConfig(num_kv_blocks=256))
    try:
        return [o.token_ids for o in whole.generate(prompts, GREEDY)]
    finally:
        whole.close()
