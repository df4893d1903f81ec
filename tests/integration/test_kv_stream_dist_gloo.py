"""Chunk-wise KV streaming over a real gloo process group (``python -m router --kv-stream dist``,
KV_STREAM_TRANSPORT_DIST), end to end over real processes on loopback: each prefill chunk waits
in the prefill worker's outbox and goes to the decode worker over gloo (``KVPeer.PushKV`` + a
receive) while the prompt is still being computed.

One cluster (store, router, 1 prefill + 1 decode worker in one gloo group; a tiny Llama with
SmolLM2's tokenizer; 32-token prefill chunks; relayed token streams) serves the module. A single
request and a parallel-sampling group (n = 3) equal the engine run whole, the prefill worker pushed
the streams' chunks over gloo, and the store saw no block put. Both workers also serve a random
PEFT LoRA adapter ("sql", ``--lora``): a request naming it is streamed over gloo the same way and
equals the engine run whole with that adapter, which differs from the base model's output (#16).
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, launch
from tests.integration.clusters import gloo_spec, logged, paced_workers, store_node_stats
from tests.integration.kv_stream_cluster import seeded_prompt
from tests.lora_adapters import make_adapter

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
N3 = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=23, ignore_eos=True, n=3)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, smollm_path):
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("kvsd"), tokenizer_from=smollm_path)["llama"]


# each worker step lasts at least this long (engine.engine_loop test pacing): on the native kernels
# a tiny model computes several 32-token chunks before the producer copies the first, and chunks
# copied together go in one push, so "one push per chunk" would depend on the host's speed
MIN_STEP_S = 0.02


def launch_paced(spec: ClusterSpec):
    """:func:`launch` with every spawned worker paced to :data:`MIN_STEP_S` per step."""
    with paced_workers(MIN_STEP_S):
        return launch(spec)


def kv_stream_spec(model_path, *, direct_streams: bool, lora: tuple[str, ...] = ()) -> ClusterSpec:
    """The modules' cluster: 1 prefill + 1 decode worker (256 KV blocks) in one gloo group,
    32-token prefill chunks streamed over it (``--kv-stream dist``), no progress deadline;
    ``lora``: the workers' extra flags that serve adapters (``--lora NAME=PATH`` ...)."""
    return gloo_spec(
        model_path,
        "--kv-stream",
        "dist",
        "--progress-timeout-s",
        "0",
        direct_streams=direct_streams,
        num_decode=1,
        kv_blocks=256,
        worker_args=("--chunk", "32", *lora),
    )


@pytest.fixture(scope="module")
def adapter(model_path, tmp_path_factory):
    """A random PEFT adapter of the tiny model (rank 8)."""
    out = tmp_path_factory.mktemp("kvsd-lora") / "sql"
    return make_adapter(model_path, out, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3)


@pytest.fixture(scope="module")
def cluster(model_path, adapter):
    # relayed token streams (direct ones: test_kv_stream_direct_dist.py)
    lora = ("--lora", f"sql={adapter}", "--max-lora-rank", "8")
    cl = launch_paced(kv_stream_spec(model_path, direct_streams=False, lora=lora))
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def whole(model_path):
    e = LLMEngine.from_pretrained(model_path, EngineConfig(num_kv_blocks=256))
    yield e
    e.close()


def _stream_pushes(cluster) -> list[dict]:
    """The prefill worker's pushes of stream chunks (outbox keys ``kvstream-...``)."""
    return [r for r in logged(cluster, "prefill-0", "direct push") if r["request_id"].startswith("kvstream-")]


def test_streamed_over_gloo_equals_the_engine_and_skips_the_store(cluster, whole):
    prompt, group_prompt = seeded_prompt(200, 21), seeded_prompt(150, 22)
    ref = whole.generate([prompt], [GREEDY])[0].token_ids
    group_ref = {o.choice_index: o.token_ids for o in whole.generate_choices(group_prompt, N3)}
    with Client(cluster.router_address, timeout=300) as c:
        got = c.complete(prompt, GREEDY, direct=False).token_ids
        pushed = len(_stream_pushes(cluster))
        choices = c.complete_choices(group_prompt, N3, direct=False)
    assert got == ref
    assert {i: ch.token_ids for i, ch in enumerate(choices)} == group_ref
    # 200 tokens in 32-token chunks: several chunks per request, each pushed over gloo to rank 1
    assert pushed >= 4 and len(_stream_pushes(cluster)) - pushed >= 3
    assert all(int(r["dst_rank"]) == 1 for r in _stream_pushes(cluster))
    node = store_node_stats(cluster)
    assert node.puts == 0 and node.num_leases == 0, node  # nothing through the store


def test_adapter_request_streamed_over_gloo_equals_the_engine_with_the_adapter(
    cluster, whole, model_path, adapter
):
    prompt = seeded_prompt(200, 23)
    eng = LLMEngine.from_pretrained(
        model_path, EngineConfig(num_kv_blocks=64), lora=LoRAConfig((AdapterSpec("sql", str(adapter)),))
    )
    try:
        rid = eng.add_request(None, prompt, GREEDY, adapter_id="sql")
        ref: list[int] = []
        while eng.has_unfinished():
            for o in eng.step():
                if o.request_id == rid:
                    ref.extend(o.new_token_ids)
    finally:
        eng.close()
    assert ref != whole.generate([prompt], [GREEDY])[0].token_ids  # the adapter changes the output
    before = len(_stream_pushes(cluster))
    puts0 = store_node_stats(cluster).puts
    with Client(cluster.router_address, timeout=300) as c:
        got = c.complete(prompt, GREEDY, direct=False, adapter="sql").token_ids
    assert got == ref
    assert len(_stream_pushes(cluster)) - before >= 4  # its chunks went over gloo
    node = store_node_stats(cluster)
    assert node.puts == puts0 and node.num_leases == 0, node
