"""pdserve.cluster_config: YAML -> frozen dataclasses, with errors that name the key to fix."""

from __future__ import annotations

import dataclasses

import pytest

from engine.scheduler import SchedulingPolicy
from pdserve.cluster_config import (
    ClusterConfig,
    Device,
    IndexKind,
    PoolConfig,
    PoolRole,
    from_dict,
    load,
)
from pdserve.errors import InvalidRequestError
from pdserve.kv_transfer import KVTransport


def test_minimal_config_gets_defaults():
    c = from_dict({"model": "/m"})
    assert c.model == "/m" and c.prefill.count == 1 and c.decode.count == 1
    assert c.index.kind is IndexKind.MEMORY and c.namespace == "pdserve" and c.host == "node"
    assert c.prefill.bundle() == {"CPU": 1.0} and c.prefill.num_gpus == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.model = "/x"  # type: ignore[misc]


def test_full_config_parses_sections_and_enums():
    c = from_dict(
        {
            "model": "/m",
            "prefill": {"count": 2, "num_cpus": 4, "kv_blocks": 512, "chunk": 256},
            "decode": {"count": 3, "num_cpus": 2, "device": "CUDA", "tp": 2},
            "store": {"capacity_blocks": 100, "host_id_per_node": True},
            "router": {"port": 50051, "heartbeat_timeout_s": 5, "node_resource": "head"},
            "index": {"kind": "redis", "url": "redis://r:6379/0"},
            "max_restarts": -1,
        }
    )
    assert c.pool(PoolRole.PREFILL).count == 2 and c.prefill.chunk == 256
    assert c.decode.device is Device.CUDA and c.decode.num_gpus == 2
    assert c.decode.bundle() == {"CPU": 2.0, "GPU": 2.0}
    assert c.router.heartbeat_timeout_s == 5.0 and isinstance(c.router.heartbeat_timeout_s, float)
    assert c.index.kind is IndexKind.REDIS and c.store.host_id_per_node


def test_pool_swap_space_and_scheduling_policy_reach_the_engine_config():
    """The worker flags --swap-space/--scheduling-policy as pool keys (#15)."""
    c = from_dict({"model": "/m", "decode": {"swap_space_gib": 0.5, "scheduling_policy": "mlfq"}})
    assert c.decode.swap_space_gib == 0.5 and c.decode.scheduling_policy == "mlfq"
    assert c.prefill.swap_space_gib == 0.0 and c.prefill.scheduling_policy == "priority"
    e = c.decode.engine_config()  # what each decode worker's engine is built with
    assert e.swap_space_bytes == 1 << 29 and e.scheduling_policy is SchedulingPolicy.MLFQ
    assert e.num_kv_blocks == c.decode.kv_blocks and e.long_prefill_token_threshold == c.decode.chunk
    assert c.prefill.engine_config().swap_space_bytes == 0
    # the engine's disk tier behind the host pool (cold KV, #15)
    c = from_dict(
        {"model": "/m", "decode": {"swap_space_gib": 0.5, "swap_disk_gib": 2, "swap_disk_dir": "/d"}}
    )
    e = c.decode.engine_config()
    assert e.swap_disk_bytes == 2 << 30 and e.swap_disk_dir == "/d"
    assert c.prefill.engine_config().swap_disk_bytes == 0 and c.prefill.engine_config().swap_disk_dir is None
    # max_model_len: 0 keeps the model's own limit
    c = from_dict({"model": "/m", "decode": {"max_model_len": 4096}})
    assert c.decode.engine_config().max_model_len == 4096 and c.prefill.engine_config().max_model_len is None


def test_lora_section_reaches_every_worker_as_a_lora_config():
    """``lora:`` is the cluster counterpart of the workers' --lora flags (#16)."""
    c = from_dict({"model": "/m", "lora": {"adapters": {"sql": "/a/sql", "chat": "/a/chat"}, "max_loras": 2}})
    lc = c.lora.lora_config()
    assert [(a.name, a.path) for a in lc.adapters] == [("sql", "/a/sql"), ("chat", "/a/chat")]
    assert lc.max_loras == 2 and lc.max_lora_rank is None and lc.max_cpu_loras is None
    assert from_dict({"model": "/m"}).lora.lora_config() is None  # base model only
    c = from_dict({"model": "/m", "lora": {"adapters": {"a": "/x"}, "max_lora_rank": 16, "max_cpu_loras": 4}})
    assert c.lora.lora_config().max_lora_rank == 16 and c.lora.lora_config().max_cpu_loras == 4


def test_cpu_only_zero_cpus_needs_no_placement_group():
    assert PoolConfig(num_cpus=0).bundle() == {}


def test_with_counts_replaces_only_given_pools():
    c = from_dict({"model": "/m", "decode": {"count": 2, "kv_blocks": 64}})
    d = c.with_counts(decode=5)
    assert d.decode.count == 5 and d.decode.kv_blocks == 64 and d.prefill == c.prefill
    assert c.decode.count == 2


@pytest.mark.parametrize(
    "raw, match",
    [
        ({}, r"model: missing"),
        ({"model": ""}, r"model: set the path"),
        ({"model": "/m", "prefil": {}}, r"unknown key\(s\) \['prefil'\]"),
        ({"model": "/m", "decode": {"cout": 1}}, r"decode: unknown key\(s\) \['cout'\]"),
        ({"model": "/m", "decode": {"count": "two"}}, r"decode.count: expected an integer"),
        ({"model": "/m", "decode": {"count": -1}}, r"decode.count: must be >= 0"),
        ({"model": "/m", "decode": {"tp": 0}}, r"decode.tp: must be >= 1"),
        ({"model": "/m", "decode": {"device": "tpu"}}, r"decode.device: 'tpu' is not one of"),
        ({"model": "/m", "decode": {"block_size": 32}}, r"decode.block_size: prefill and decode"),
        ({"model": "/m", "router": {"port": 70000}}, r"router.port: must be in"),
        ({"model": "/m", "router": {"heartbeat_timeout_s": 0.1}}, r"router.heartbeat_timeout_s"),
        ({"model": "/m", "index": {"kind": "redis"}}, r"index.url: a redis index needs url"),
        ({"model": "/m", "store": {"host_id_per_node": "yes"}}, r"store.host_id_per_node: expected true"),
        ({"model": "/m", "store": {"capacity_blocks": 0}}, r"store.capacity_blocks: must be >= 1"),
        ({"model": "/m", "prefill": [1]}, r"prefill: expected a mapping"),
        (["model"], r"top level: expected a mapping"),
        ({"model": "/m", "decode": {"swap_space_gib": -1}}, r"decode.swap_space_gib: must be >= 0"),
        ({"model": "/m", "decode": {"swap_space_gib": 1, "tp": 2}}, r"decode.swap_space_gib: .*tensor"),
        ({"model": "/m", "decode": {"swap_disk_gib": 1}}, r"decode.swap_disk_gib: needs swap_space_gib"),
        (
            {"model": "/m", "decode": {"swap_space_gib": 1, "swap_disk_gib": -1}},
            r"decode.swap_disk_gib: must be",
        ),
        ({"model": "/m", "decode": {"swap_disk_dir": "/d"}}, r"decode.swap_disk_dir: needs swap_disk_gib"),
        (
            {"model": "/m", "decode": {"scheduling_policy": "sjf"}},
            r"decode.scheduling_policy: must be one of",
        ),
        ({"model": "/m", "decode": {"max_model_len": -1}}, r"decode.max_model_len: must be >= 0"),
        ({"model": "/m", "lora": ["sql"]}, r"lora: expected a mapping"),
        ({"model": "/m", "lora": {"adapters": ["sql=/a"]}}, r"lora.adapters: expected a mapping NAME: PATH"),
        ({"model": "/m", "lora": {"adapters": {"sql": 3}}}, r"lora.adapters.sql: expected NAME: PATH"),
        (
            {"model": "/m", "lora": {"adapters": {"sql": "/a"}, "max_lora": 2}},
            r"lora: unknown key\(s\) \['max_lora'\]",
        ),
        (
            {"model": "/m", "lora": {"adapters": {"sql": "/a"}, "max_loras": 0}},
            r"lora: max_loras must be >= 1",
        ),
        (
            {"model": "/m", "lora": {"adapters": {"sql": "/a"}, "max_cpu_loras": -1}},
            r"lora.max_cpu_loras: must be >= 0",
        ),
        ({"model": "/m", "lora": {"adapters": {"bad name": "/a"}}}, r"lora: LoRA adapter name 'bad name'"),
        ({"model": "/m", "lora": {"max_loras": 2}}, r"lora.adapters: max_loras.* without any adapter"),
    ],
)
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(InvalidRequestError, match=match):
        from_dict(raw)


def test_load_reads_yaml_and_reports_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: /m\ndecode: {count: 4}\n")
    assert load(p) == dataclasses.replace(ClusterConfig(model="/m"), decode=PoolConfig(count=4))
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    p.write_text("model: [unclosed\n")
    with pytest.raises(InvalidRequestError, match="not valid YAML"):
        load(p)


# ---------------------------------------------------------------------------- scale planning
def test_plan_scale_adds_and_removes_newest_first():
    from pdserve.ray_cluster import plan_scale

    live = {PoolRole.PREFILL: ["prefill-0"], PoolRole.DECODE: ["decode-10", "decode-2", "decode-0"]}
    add, remove = plan_scale(live, {PoolRole.PREFILL: 3, PoolRole.DECODE: 1})
    assert add == [PoolRole.PREFILL, PoolRole.PREFILL]
    assert remove == ["decode-10", "decode-2"]  # by number, not by string order
    assert plan_scale(live, {PoolRole.PREFILL: None, PoolRole.DECODE: 3}) == ([], [])
    assert plan_scale(live, {PoolRole.PREFILL: 0, PoolRole.DECODE: None}) == ([], ["prefill-0"])
    with pytest.raises(InvalidRequestError, match="--decode must be >= 0"):
        plan_scale(live, {PoolRole.DECODE: -1})


def test_capacity_shortfall_names_what_the_ray_cluster_lacks() -> None:
    from pdserve.cluster_config import capacity_shortfall

    gpu = from_dict(
        {
            "model": "/m",
            "prefill": {"count": 1, "num_cpus": 1, "device": "cuda", "tp": 2},
            "decode": {"count": 2, "num_cpus": 1, "device": "cuda", "tp": 1},
            "store": {"num_cpus": 0.5},
        }
    )
    msg = capacity_shortfall(gpu, {"CPU": 16.0}, num_nodes=2)
    assert msg is not None
    assert "4 GPU (prefill: 1 x 2 GPU (tp 2), decode: 2 x 1 GPU (tp 1)) but the Ray cluster has 0" in msg
    assert capacity_shortfall(gpu, {"CPU": 16.0, "GPU": 4.0}, num_nodes=2) is None
    # CPUs: 3 workers + a half-CPU store node on each of 4 nodes = 5
    msg = capacity_shortfall(gpu, {"CPU": 4.0, "GPU": 8.0}, num_nodes=4)
    assert (
        msg is not None and "5 CPU" in msg and "store nodes: 2 CPU" in msg and "GPU" not in msg.split(":")[0]
    )
    assert capacity_shortfall(from_dict({"model": "/m"}), {"CPU": 2.0}, 1) is None
    assert capacity_shortfall(from_dict({"model": "/m", "decode": {"count": 0}}), {"CPU": 1.0}, 1) is None


def test_several_models_each_with_pools_and_adapters() -> None:
    """``models``: each model's pools and adapters; views() gives one single-model config per
    model (what its workers and store nodes are built from), tagged with the model's id."""
    from pdserve.cluster_config import capacity_shortfall

    c = from_dict(
        {
            "models": [
                {"model": "/m/A", "decode": {"count": 2, "tp": 2}, "lora": {"adapters": {"sql": "/a"}}},
                {"model": "/m/B", "prefill": {"count": 0, "kv_blocks": 64}},
            ],
            "router": {"policy": "least_loaded"},
        }
    )
    assert c.several and c.model == "" and c.model_ids == ["A", "B"]
    a, b = c.views()
    assert (a.model, a.model_tag, a.decode.count, a.decode.tp, a.prefill.count) == ("/m/A", "A", 2, 2, 1)
    assert a.lora.lora_config() is not None and b.lora.lora_config() is None
    assert (b.model, b.model_tag, b.prefill.count, b.prefill.kv_blocks) == ("/m/B", "B", 0, 64)
    assert a.router == b.router == c.router and not a.several
    assert from_dict({"model": "/m/A"}).views()[0].model_tag == ""
    # capacity: every model's pools and a store node per model per Ray node
    msg = capacity_shortfall(c, {"CPU": 3.0}, num_nodes=1)
    assert msg is not None and "A.decode: 2 x 1 CPU" in msg and "B.decode: 1 x 1 CPU" in msg
    assert capacity_shortfall(c, {"CPU": 4.0}, num_nodes=1) is None


def test_several_models_with_the_direct_handoff_get_a_process_group_each() -> None:
    """``kv_transfer: dist`` with several models: each model's view keeps the dist handoff (its
    workers form their own group, see pdserve.ray_cluster), a fixed port becomes port + i."""
    two = [{"model": "/m/A"}, {"model": "/m/B"}]
    c = from_dict({"models": two, "kv_transfer": {"kind": "dist", "backend": "gloo", "port": 29500}})
    a, b = c.views()
    assert a.kv_transfer.kind is b.kv_transfer.kind is KVTransport.DIST
    assert (a.kv_transfer.port, b.kv_transfer.port) == (29500, 29501)
    free = from_dict({"models": two, "kv_transfer": {"kind": "dist"}})
    assert [v.kv_transfer.port for v in free.views()] == [0, 0]  # each group's rank 0 picks a free one
    store = from_dict({"models": two, "kv_transfer": {"kind": "store", "port": 7000}})
    assert [v.kv_transfer.port for v in store.views()] == [7000, 7000]  # no group: left as given
    cuda = {"device": "cuda"}
    with pytest.raises(
        InvalidRequestError, match=r"kv_transfer.backend: .* set models\[1\]\.prefill\.device: cuda"
    ):
        from_dict(
            {
                "models": [{"model": "/m/A", "prefill": cuda, "decode": cuda}, {"model": "/m/B"}],
                "kv_transfer": {"kind": "dist", "backend": "nccl"},
            }
        )


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"models": [{"model": "/m/A"}, {"model": "/m/B"}], "model": "/m/A"},
            r"models: .*model in its entry",
        ),
        ({"models": [{"model": "/m/A"}, {"model": "/m/B"}], "decode": {"count": 1}}, r"models: .*decode"),
        ({"models": [{"model": "/m/A"}]}, r"models: list two or more models"),
        ({"models": [{"model": "/m/A"}, {"model": "/n/A"}]}, r"models: .*distinct, got \['A', 'A'\]"),
        ({"models": {"model": "/m/A"}}, r"models: expected a list"),
        ({"models": [{"model": "/m/A"}, {"path": "/m/B"}]}, r"models\[1\]: unknown key\(s\) \['path'\]"),
        ({"models": [{"model": "/m/A"}, {"prefill": {}}]}, r"models\[1\].model: set the path"),
        ({"models": [{"model": "/m/A"}, {"model": "/m/B", "decode": {"tp": 0}}]}, r"models\[1\].decode.tp"),
        ({"models": [{"model": "/m/A", "lora": {"max_loras": 2}}, {"model": "/m/B"}]}, r"models\[0\].lora"),
        (
            {
                "models": [{"model": "/m/A"}, {"model": "/m/B"}],
                "kv_transfer": {"kind": "dist", "port": 65535},
            },
            r"kv_transfer.port: each of the 2 models' process groups takes a port from 65535: past 65535",
        ),
        ({"model": "/m/A", "model_tag": "A"}, r"top level: unknown key\(s\) \['model_tag'\]"),
    ],
)
def test_bad_several_model_configs_name_the_key(raw, match) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        from_dict(raw)
