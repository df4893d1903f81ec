"""``--kv-stream dist`` for direct token streams over real processes: the cluster of
tests/integration/test_kv_stream_dist_gloo.py (store, router, 1 prefill + 1 decode worker in one
gloo group, 32-token prefill chunks) with direct streams on (the launcher's default). A direct
request's KV goes by the stream over gloo (the prefill worker pushed its chunks to the decode
rank; the store saw no put) and its tokens straight from the decode worker (the client attached
there); output (tokens and text) equals the engine run whole."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from tests.integration.clusters import store_node_stats
from tests.integration.kv_stream_cluster import seeded_prompt
from tests.integration.test_kv_stream_dist_gloo import (
    _stream_pushes,
    kv_stream_spec,
    launch_paced,
    model_path,  # noqa: F401 - the module's tiny model (a fixture)
    whole,  # noqa: F401 - the engine run whole (a fixture)
)

SEEDED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(model_path):  # noqa: F811 - the fixture
    cl = launch_paced(kv_stream_spec(model_path, direct_streams=True))
    yield cl
    cl.stop()


def test_direct_stream_streamed_over_gloo_equals_the_engine(cluster, whole) -> None:  # noqa: F811
    prompt = seeded_prompt(200, 31)
    ref = whole.generate([prompt], [SEEDED])[0]
    with Client(cluster.router_address, timeout=300) as c:
        toks: list[int] = []
        text = ""
        for ch in c.generate(prompt, SEEDED, direct=True):
            toks += ch.token_ids
            text += ch.text
        attached = set(c._direct_mux._conns)
    assert toks == ref.token_ids and text == ref.text
    decode = {a for w, a in cluster.workers.items() if w.startswith("decode")}
    assert attached and attached <= decode  # the tokens came from the decode worker
    # 200 tokens in 32-token chunks, each pushed over gloo to the decode rank
    assert len(_stream_pushes(cluster)) >= 4
    assert all(int(r["dst_rank"]) == 1 for r in _stream_pushes(cluster))
    node = store_node_stats(cluster)
    assert node.puts == 0 and node.num_leases == 0, node  # nothing through the store
