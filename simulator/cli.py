"""``pdserve simulate | plan | plan-mix | simulate-mix | profile``: argparse wiring only (the work is in the modules).

``register(subparsers)`` adds the three subcommands; each sets ``func`` to a handler taking the
parsed namespace and returning an exit status (the ``pdserve`` convention).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pdserve.arg_types import fraction, positive_int, positive_number, positive_seconds
from pdserve.errors import InvalidRequestError, PdserveError
from router.policy import SLO, InstanceRole, PolicyKind
from simulator.adapters import AdapterConfig, AdapterPopularity, with_adapters
from simulator.config import (
    CacheConfig,
    ClusterConfig,
    HostPool,
    InstanceGroup,
    SchedulerPreset,
    SimConfig,
    sarathi_scheduler,
    vllm_scheduler,
)
from simulator.kv_store import SimKVStoreConfig
from simulator.latency import DistServeEngine, LatencySource, LatencySpec
from simulator.offload import SimOffloadConfig
from simulator.workload import WORKLOAD_NAMES, RateSource, named_workload

log = logging.getLogger(__name__)


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="model name (llama-2-7b, llama-3-8b, opt-13b, ...) or profile's model"
    )
    p.add_argument("--gpu", default="a100", choices=["a100", "h100"], help="GPU type of the latency model")
    p.add_argument(
        "--latency", default="auto", choices=[s.value for s in LatencySource], help="latency model source"
    )
    p.add_argument(
        "--profile-file", default=None, help="profile JSON from `pdserve profile` (latency=profile)"
    )
    p.add_argument(
        "--transfer-gbps",
        type=positive_number,
        default=200.0,
        help="KV transfer bandwidth between instances, Gb/s",
    )
    p.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="longest sequence in tokens (default: the model's)",
    )


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload", default="sharegpt", help=f"{', '.join(WORKLOAD_NAMES)} or a .jsonl/.csv trace path"
    )
    p.add_argument(
        "--num-requests", type=positive_int, default=None, help="request count (synthetic) or trace prefix"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic workloads and arrivals")
    p.add_argument("--ttft", type=positive_seconds, default=0.25, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=positive_seconds, default=0.1, help="TPOT SLO, seconds")
    p.add_argument("--target", type=fraction, default=0.9, help="SLO attainment target for goodput")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    """LoRA adapters (simulator.adapters): the catalogue, the workload's mix, the tiers."""
    p.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="LoRA adapters every instance serves (lora-0 .. lora-N-1); requests name them (0: base model only)",
    )
    p.add_argument(
        "--adapter-popularity",
        default=AdapterPopularity.ZIPF.value,
        choices=[x.value for x in AdapterPopularity],
        help="how requests pick adapters",
    )
    p.add_argument("--adapter-zipf-s", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    p.add_argument(
        "--adapter-base-share", type=float, default=0.0, help="share of requests on the base model"
    )
    p.add_argument(
        "--adapter-rank", default="16", help="adapter ranks, comma-separated (adapter i: rank i mod n)"
    )
    p.add_argument(
        "--max-loras", type=int, default=8, help="adapter slots in engine memory per instance (LRU)"
    )
    p.add_argument(
        "--max-cpu-loras", type=int, default=0, help="adapters in host memory per instance (0: all)"
    )
    p.add_argument(
        "--adapter-h2d-gbs", type=positive_number, default=25.0, help="host -> device adapter copy, GB/s"
    )
    p.add_argument(
        "--adapter-disk-gbs", type=positive_number, default=3.0, help="disk -> host adapter read, GB/s"
    )
    p.add_argument(
        "--adapter-bytes-per-rank",
        type=int,
        default=None,
        help="bytes of one adapter rank over all targets (default: from the model's shape)",
    )


_OFFLOAD_FLAGS = {  # flag dest -> SimOffloadConfig field
    "weight_budget_gib": "weight_budget_gib",
    "weight_host_gib": "weight_host_gib",
    "kv_budget_gib": "kv_budget_gib",
    "kv_host_gib": "kv_host_gib",
    "kv_disk_gib": "kv_disk_gib",
    "device_budget_gib": "device_budget_gib",
}


def _offload_args(p: argparse.ArgumentParser) -> None:
    """Weight and KV offloading (simulator.offload): the engine's budgets, per instance."""
    p.add_argument(
        "--weight-budget-gib",
        type=float,
        default=None,
        help="device memory for the weights per instance; the rest of the layers go to host (then disk)",
    )
    p.add_argument(
        "--weight-host-gib",
        type=float,
        default=None,
        help="host memory for offloaded weight layers (default: unlimited); the rest on disk",
    )
    p.add_argument(
        "--kv-budget-gib",
        type=float,
        default=None,
        help="device memory for the KV pool (default: what the weights leave)",
    )
    p.add_argument(
        "--kv-host-gib",
        type=float,
        default=None,
        help="host memory for offloaded layers' KV: the pool grows to use it (FlexGen KV offloading)",
    )
    p.add_argument(
        "--kv-disk-gib",
        type=float,
        default=None,
        help="disk for offloaded layers' KV beyond --kv-host-gib: the pool grows to use it too",
    )
    p.add_argument(
        "--device-budget-gib",
        type=float,
        default=None,
        help="weights + KV device memory, split by the cost model (needs --kv-blocks)",
    )
    p.add_argument(
        "--offline-batch",
        action="store_true",
        help="max_num_seqs = the cost model's offline batch for the offloaded weights (needs --weight-budget-gib)",
    )
    p.add_argument("--offload-host-gbs", type=positive_number, default=25.0, help="host -> device copy, GB/s")
    p.add_argument("--offload-disk-gbs", type=positive_number, default=3.0, help="disk -> device read, GB/s")


def _store_args(p: argparse.ArgumentParser) -> None:
    """The cluster's KV store with an SSD tier (simulator.kv_store)."""
    p.add_argument(
        "--kv-store-blocks",
        type=int,
        default=0,
        help="KV store DRAM capacity in KV blocks: prefills publish prompts, the router fetches from it (0: no store)",
    )
    p.add_argument(
        "--kv-store-disk-blocks",
        type=int,
        default=0,
        help="the store's SSD tier in KV blocks (0: none, -1: unlimited)",
    )
    p.add_argument(
        "--kv-store-disk-gbs", type=positive_number, default=3.0, help="the SSD tier's read bandwidth, GB/s"
    )


def _store_config(a: argparse.Namespace) -> SimKVStoreConfig | None:
    """``--kv-store-*`` -> ``SimKVStoreConfig`` (None without ``--kv-store-blocks``); ValueError naming the flag."""
    n = getattr(a, "kv_store_blocks", 0)
    disk = getattr(a, "kv_store_disk_blocks", 0)
    gbs = getattr(a, "kv_store_disk_gbs", 3.0)
    if not n:
        if disk or gbs != 3.0:
            raise ValueError("--kv-store-disk-blocks / --kv-store-disk-gbs need --kv-store-blocks")
        return None
    if n < 0:
        raise ValueError(f"--kv-store-blocks must be >= 0, got {n}")
    if disk < -1:
        raise ValueError(f"--kv-store-disk-blocks must be >= 0 or -1 (unlimited), got {disk}")
    if not (math.isfinite(gbs) and gbs > 0):
        raise ValueError(f"--kv-store-disk-gbs must be > 0, got {gbs}")
    return SimKVStoreConfig(n, None if disk == -1 else disk, gbs)


def _offload_config(a: argparse.Namespace) -> SimOffloadConfig | None:
    """The offloading flags -> ``SimOffloadConfig`` (None when no budget is set; bandwidth flags
    alone are refused); ValueError naming the flag."""
    kw = {f: getattr(a, d, None) for d, f in _OFFLOAD_FLAGS.items()}
    host = getattr(a, "offload_host_gbs", 25.0)
    disk = getattr(a, "offload_disk_gbs", 3.0)
    offline = bool(getattr(a, "offline_batch", False))
    if all(v is None for v in kw.values()):
        if offline:
            raise ValueError("--offline-batch needs --weight-budget-gib (or --device-budget-gib)")
        if host != 25.0 or disk != 3.0:
            raise ValueError(
                "--offload-host-gbs / --offload-disk-gbs need an offloading budget (--weight-budget-gib, ...)"
            )
        return None
    try:
        return SimOffloadConfig(**kw, host_gb_s=host, disk_gb_s=disk, offline_batch=offline)
    except ValueError as e:
        raise ValueError(_flag_names(str(e))) from None


def _flag_names(msg: str) -> str:
    """``msg`` with SimOffloadConfig's field names as ``pdserve simulate``'s flags."""
    for d, f in _OFFLOAD_FLAGS.items():
        msg = msg.replace(f, "--" + d.replace("_", "-"))
    msg = msg.replace("ClusterConfig.kv_blocks", "--kv-blocks").replace("offline_batch", "--offline-batch")
    return msg.replace("host_gb_s", "--offload-host-gbs").replace("disk_gb_s", "--offload-disk-gbs")


def _latency_spec(a: argparse.Namespace) -> LatencySpec:
    """The latency source of ``a``; ValueError for a model no latency table knows (with the
    default source), before anything runs."""
    src = LatencySource(a.latency)
    if a.profile_file and src is LatencySource.AUTO:
        src = LatencySource.PROFILE
    spec = LatencySpec(
        model=a.model,
        gpu=a.gpu,
        source=src,
        profile_path=a.profile_file,
        transfer_bandwidth=a.transfer_gbps * 1e9 / 8,
    )
    spec.resolved_source()  # an unknown model: "unknown model 'x'; known: ..."
    return spec


def _input_errors(name: str, cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``cmd`` with what bad input raises (ValueError: an unknown model or workload, an SLO or
    TP degree that cannot be; FileNotFoundError: a trace or profile that is not there) printed as
    one ``pdserve NAME: error: ...`` line, exit status 2, instead of a traceback. The traceback
    goes to the debug log."""

    @functools.wraps(cmd)
    def run(a: argparse.Namespace) -> int:
        try:
            return cmd(a)
        except PdserveError:
            raise  # pdserve's own errors: `pdserve`'s handler prints them
        except (ValueError, FileNotFoundError) as e:
            log.debug("pdserve %s failed", name, exc_info=True)
            print(f"pdserve {name}: error: {_flag_names(str(e))}", file=sys.stderr)
            return 2

    return run


def _out_dir(a: argparse.Namespace) -> Path | None:
    if not a.out:
        return None
    p = Path(a.out)
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- simulate
def _cluster(a: argparse.Namespace, lat: LatencySpec) -> ClusterConfig:
    cache = CacheConfig(
        enable_prefix_caching=not a.no_prefix_cache,
        host_pool=HostPool(a.host_pool),
        host_pool_tokens=a.host_pool_tokens,
    )
    kw = dict(
        block_size=a.block_size,
        max_model_len=a.max_model_len,
        cache=cache,
        policy=PolicyKind(a.policy),
        seed=a.seed,
    )
    kw["kv_blocks"] = a.kv_blocks
    kw["dispatch_overhead_s"] = getattr(a, "dispatch_overhead_ms", 0.0) / 1e3
    kw["adapters"] = _adapter_config(a)
    kw["offload"] = _offload_config(a)
    kw["kv_store"] = _store_config(a)
    probe = ClusterConfig(lat, (), **kw)
    n = probe.model_len
    mixed_sched = (
        sarathi_scheduler(n, a.chunk) if a.scheduler == SchedulerPreset.SARATHI.value else vllm_scheduler(n)
    )
    _check_pools(a)
    if a.mode == "colocated":
        groups = (InstanceGroup(InstanceRole.MIXED, a.instances, a.tp, mixed_sched),)
    elif a.mode == "disaggregated":
        groups = (
            InstanceGroup(InstanceRole.PREFILL, a.prefill, a.tp_prefill or a.tp),
            InstanceGroup(InstanceRole.DECODE, a.decode, a.tp_decode or a.tp),
        )
    else:
        groups = (
            InstanceGroup(InstanceRole.PREFILL, a.prefill, a.tp_prefill or a.tp),
            InstanceGroup(InstanceRole.DECODE, a.decode, a.tp_decode or a.tp),
            InstanceGroup(InstanceRole.MIXED, a.mixed, a.tp, mixed_sched),
        )
    return ClusterConfig(lat, groups, **kw)


def _check_pools(a: argparse.Namespace) -> None:
    """ValueError naming the flags when the cluster's pools cannot serve a request from prompt to
    last token: no instance to prefill (the simulator would count prefill as free: TTFT 0) or
    none to decode. (The planner's phase-alone clusters are built elsewhere, on purpose.)"""
    if a.mode == "colocated":
        if a.instances < 1:
            raise ValueError(f"--instances must be >= 1, got {a.instances}")
        return
    mixed = a.mixed if a.mode == "splitwise" else 0
    also = " (or --mixed)" if a.mode == "splitwise" else ""
    if a.prefill < 0 or a.decode < 0 or mixed < 0:
        raise ValueError(f"instance counts must be >= 0: --prefill {a.prefill} --decode {a.decode}")
    if a.prefill + mixed < 1:
        raise ValueError(
            f"--mode {a.mode} with --prefill {a.prefill}: no instance prefills a prompt{also}; give --prefill >= 1"
        )
    if a.decode + mixed < 1:
        raise ValueError(
            f"--mode {a.mode} with --decode {a.decode}: no instance decodes{also}; give --decode >= 1"
        )


def _adapter_config(a: argparse.Namespace) -> AdapterConfig | None:
    """``--adapters N`` and its options -> the cluster's adapters (None when N is 0); ValueError
    naming the flag."""
    n = getattr(a, "adapters", 0)
    if not n:
        return None
    if n < 0:
        raise ValueError(f"--adapters must be >= 0, got {n}")
    try:
        ranks = tuple(int(x) for x in a.adapter_rank.split(","))
    except ValueError:
        raise ValueError(f"--adapter-rank expects comma-separated integers, got {a.adapter_rank!r}") from None
    if a.max_cpu_loras < 0:
        raise ValueError(f"--max-cpu-loras must be >= 0 (0: all in host memory), got {a.max_cpu_loras}")
    return AdapterConfig(
        num_adapters=n,
        ranks=ranks,
        max_loras=a.max_loras,
        max_cpu_loras=a.max_cpu_loras or None,
        host_to_device_gb_s=a.adapter_h2d_gbs,
        disk_gb_s=a.adapter_disk_gbs,
        bytes_per_rank=a.adapter_bytes_per_rank,
    )


def _adapter_totals(res) -> str:
    """One line of the instances' adapter counters (a run with ``--adapters``)."""
    st = res.instance_stats.values()

    def tot(k: str) -> float:
        return sum(s.get(k, 0) for s in st)

    return (
        f"adapters: slot loads {tot('adapter_slot_loads'):.0f}, disk reads {tot('adapter_disk_loads'):.0f}, "
        f"slot evictions {tot('adapter_slot_evictions'):.0f}, copies {tot('adapter_copy_s'):.3f} s, "
        f"request wait {tot('adapter_wait_s'):.2f} s"
    )


def cmd_simulate(a: argparse.Namespace) -> int:
    from simulator.goodput import cluster_goodput
    from simulator.metrics import format_summary
    from simulator.plots import plot_attainment, plot_cdfs
    from simulator.sim import Simulation

    lat = _latency_spec(a)
    try:
        cluster = _cluster(a, lat)
        if cluster.adapters is not None and a.goodput:
            raise ValueError("--goodput with --adapters: the goodput search's workloads name no adapters")
        plans = [cluster.offload_plan(g) for g in cluster.groups if g.count]
    except ValueError as e:
        print(f"pdserve simulate: error: {_flag_names(str(e))}", file=sys.stderr)
        return 2
    slo = SLO(a.ttft, a.tpot)
    base = named_workload(a.workload, n=a.num_requests, rate=a.rate, seed=a.seed)
    if cluster.adapters is not None:
        base = with_adapters(
            base,
            cluster.adapters.num_adapters,
            AdapterPopularity(a.adapter_popularity),
            zipf_s=a.adapter_zipf_s,
            base_share=a.adapter_base_share,
            seed=a.seed,
        )
    out = _out_dir(a)
    sim = Simulation(cluster, SimConfig(slo=slo, attainment_target=a.target, progress=not a.quiet))
    print(
        f"cluster: {cluster.mode.value}, {cluster.num_gpus} GPUs, {lat.model} on {lat.gpu} ({lat.resolved_source().value})"
    )
    for g, plan in zip([g for g in cluster.groups if g.count], plans, strict=True):
        if plan is not None:
            print(f"{g.role.value}: {plan.describe()}")
            choice = cluster.offline_batch_for(g)
            if choice is not None:
                print(
                    f"{g.role.value}: offline batch {choice.batch_size} sequences (predicted step "
                    f"{choice.step_s * 1e3:.1f} ms, {choice.seqs_per_s:.0f} seq/s)"
                )
    if a.rates:
        rates = [float(x) for x in a.rates.split(",")]
        curve = []
        results = {}
        summaries = {}
        for r in rates:
            res = sim.run(base.with_rate(r))
            curve.append((r, res.attainment(slo)))
            results[f"{r:g} req/s"] = res
            summaries[f"{r:g}"] = res.summary(slo)
            print(f"rate {r:g} req/s: attainment {100 * curve[-1][1]:.1f}%  wall {res.wall_time_s:.2f}s")
            if out:
                res.write_csv(out / f"requests_rate{r:g}.csv")
        if out:
            plot_attainment({cluster.mode.value: curve}, out / "attainment.png", a.target)
            plot_cdfs(results, out / "latency_cdf.png")
            (out / "attainment.json").write_text(json.dumps(curve))
            (out / "summary.json").write_text(json.dumps({"by_rate": summaries}, indent=1))
    else:
        res = sim.run(base)
        s = res.summary(slo)
        print(format_summary(s))
        if cluster.adapters is not None:
            print(_adapter_totals(res))
        if res.store is not None:
            st = res.store
            print(
                f"kv store: {st.fetches} fetches, {st.fetched_blocks} blocks ({st.disk_blocks_read} read from "
                f"its disk tier), {st.fetch_s:.2f} s of fetch time"
            )
        if out:
            res.write_csv(out / "requests.csv")
            (out / "summary.json").write_text(
                json.dumps({"summary": s, "instances": res.instance_stats}, indent=1)
            )
            plot_cdfs({cluster.mode.value: res}, out / "latency_cdf.png")
    if a.goodput:
        src = (
            RateSource(duration_s=a.duration, seed=a.seed)
            if a.workload == "sharegpt"
            else RateSource(base=base, duration_s=a.duration)
        )
        g = cluster_goodput(cluster, src, slo, a.target)
        print(
            f"goodput: {g.rate:.3f} req/s ({g.per_gpu(cluster.num_gpus):.3f} per GPU) at {100 * a.target:.0f}% attainment"
        )
    if out:
        print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- plan
def cmd_plan(a: argparse.Namespace) -> int:
    from simulator.planner import PlanSpec, plan

    lat = _latency_spec(a)
    if a.workload == "sharegpt":
        src = RateSource(duration_s=a.duration, seed=a.seed)
    else:
        src = RateSource(
            base=named_workload(a.workload, n=a.num_requests, seed=a.seed), duration_s=a.duration
        )
    col_lat = None
    if a.baseline_engine == "vllm":
        col_lat = LatencySpec(
            lat.model,
            lat.gpu,
            LatencySource.DISTSERVE,
            transfer_bandwidth=lat.transfer_bandwidth,
            distserve_engine=DistServeEngine.VLLM,
        )
    spec = PlanSpec(
        latency=lat,
        num_gpus=a.gpus,
        workload=src,
        slo=SLO(a.ttft, a.tpot),
        target=a.target,
        tp_options=tuple(int(x) for x in a.tp.split(",")),
        colocated_latency=col_lat,
        policy=PolicyKind(a.policy),
        verify_top=a.verify,
        block_size=a.block_size,
    )
    rep = plan(spec, progress=not a.quiet)
    print(
        f"{lat.model} on {a.gpus} x {lat.gpu}, SLO TTFT {a.ttft}s TPOT {a.tpot}s at {100 * a.target:.0f}%, "
        f"workload {a.workload}"
    )
    print(rep.table(a.top))
    if a.out:
        out = _out_dir(a)
        assert out is not None
        data = {
            "phase_goodput": {f"{k}/tp{tp}": v for (k, tp), v in rep.phase_goodput.items()},
            "disaggregated": [_entry(e) for e in rep.disaggregated[: a.top]],
            "colocated": [_entry(e) for e in rep.colocated[: a.top]],
            "advantage": rep.advantage,
        }
        (out / "plan.json").write_text(json.dumps(data, indent=1))
        print(f"wrote {out / 'plan.json'}")
    return 0


def parse_mix_model(text: str) -> tuple[str, float]:
    """``MODEL:RATE`` -> (model, requests/s); ValueError naming the bad part."""
    model, sep, rate = text.rpartition(":")
    if not sep or not model:
        raise ValueError(f"--model expects MODEL:RATE (e.g. llama-2-7b:2.0), got {text!r}")
    try:
        r = float(rate)
    except ValueError:
        raise ValueError(f"--model {text!r}: rate {rate!r} is not a number") from None
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"--model {text!r}: rate must be > 0 requests/s")
    return model, r


_POOL_ROLES = {"P": InstanceRole.PREFILL, "D": InstanceRole.DECODE, "M": InstanceRole.MIXED}


def parse_pools(text: str) -> tuple[InstanceGroup, ...]:
    """``1P2D`` (disaggregated: prefill and decode instances), ``2M`` (colocated) or ``1P1D1M``
    (Splitwise), each instance on one GPU -> the instance groups; ValueError naming the bad part."""
    import re

    parts = re.findall(r"(\d+)([PDM])", text)
    if not parts or "".join(n + r for n, r in parts) != text:
        raise ValueError(f"pools {text!r}: expected counts and roles such as 1P2D, 2M or 1P1D1M")
    roles = [r for _, r in parts]
    if len(set(roles)) != len(roles):
        raise ValueError(f"pools {text!r}: a role appears twice")
    groups = tuple(InstanceGroup(_POOL_ROLES[r], int(n)) for n, r in parts)
    if sum(g.count for g in groups) < 1:
        raise ValueError(f"pools {text!r}: at least one instance")
    if ("P" in roles) != ("D" in roles):
        raise ValueError(f"pools {text!r}: prefill instances need decode instances and the reverse")
    return groups


def parse_mix_pools(text: str, with_rate: bool) -> tuple[str, tuple[InstanceGroup, ...], float | None]:
    """``MODEL:POOLS:RATE`` (``with_rate``) or ``MODEL:POOLS`` (the rates come from a trace) ->
    (model, instance groups, requests/s or None); ValueError naming the bad part."""
    parts = text.split(":")
    want = 3 if with_rate else 2
    form = (
        "MODEL:POOLS:RATE (e.g. llama-2-7b:1P1D:2.0)"
        if with_rate
        else "MODEL:POOLS with --trace (e.g. llama-2-7b:1P1D)"
    )
    if len(parts) != want or not parts[0]:
        raise ValueError(f"--model expects {form}, got {text!r}")
    rate = None
    if with_rate:
        _, rate = parse_mix_model(f"{parts[0]}:{parts[2]}")
    return parts[0], parse_pools(parts[1]), rate


def cmd_simulate_mix(a: argparse.Namespace) -> int:
    from simulator.mix import ModelDemand, load_mixed_jsonl, mixed_workload, simulate_mixed
    from simulator.planner import Candidate

    try:
        parsed = [parse_mix_pools(t, with_rate=not a.trace) for t in a.model]
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    names = [m for m, _, _ in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"--model: each model once, got {names}")
    slo = SLO(a.ttft, a.tpot)
    pools = {}
    demands = []
    for i, (model, groups, rate) in enumerate(parsed):
        lat = LatencySpec(
            model=model,
            gpu=a.gpu,
            source=LatencySource(a.latency),
            transfer_bandwidth=a.transfer_gbps * 1e9 / 8,
        )
        pools[model] = (ClusterConfig(lat, groups, block_size=a.block_size, policy=PolicyKind(a.policy)), slo)
        if rate is not None:
            # rate x duration requests each (no minimum): every model's arrivals span the window
            # goodput is counted over
            src = RateSource(duration_s=a.duration, min_requests=1, seed=a.seed + i)
            demands.append(ModelDemand(model, lat, rate, src, slo))
    workload = load_mixed_jsonl(a.trace, a.num_requests) if a.trace else mixed_workload(demands)
    res = simulate_mixed(workload, pools, a.target)
    print(
        f"{len(pools)} models on their own pools ({a.gpu}), {len(workload)} requests over "
        f"{workload.duration_s:.1f} s, SLO TTFT {a.ttft}s TPOT {a.tpot}s"
    )
    print(res.table())
    if a.out:
        out = _out_dir(a)
        assert out is not None
        data = {
            "requests": res.num_requests,
            "window_s": workload.duration_s,
            "attainment": res.attainment,
            "goodput": res.goodput,
            "models": [
                {
                    "name": r.name,
                    "pools": Candidate(r.cluster.groups).label,
                    "gpus": r.cluster.num_gpus,
                    "requests": r.num_requests,
                    "attainment": r.attainment,
                    "goodput": r.goodput,
                    "ttft_p90": r.percentile("ttft", 90),
                    "tpot_p90": r.percentile("tpot", 90),
                }
                for r in res.runs
            ],
        }
        (out / "simulate_mix.json").write_text(json.dumps(data, indent=1))
        print(f"wrote {out / 'simulate_mix.json'}")
    return 0


def cmd_plan_mix(a: argparse.Namespace) -> int:
    from collections import Counter

    from pdserve.errors import InvalidRequestError
    from simulator.mix import ModelDemand, plan_mix

    try:
        parsed = [parse_mix_model(t) for t in a.model]
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    counts = Counter(m for m, _ in parsed)
    demands = []
    for i, (model, rate) in enumerate(parsed):
        lat = LatencySpec(
            model=model,
            gpu=a.gpu,
            source=LatencySource(a.latency),
            transfer_bandwidth=a.transfer_gbps * 1e9 / 8,
        )
        lat.resolved_source()  # an unknown model: named, not "fits no TP degree"
        if a.workload == "sharegpt":
            src = RateSource(duration_s=a.duration, seed=a.seed + i)
        else:
            src = RateSource(
                base=named_workload(a.workload, n=a.num_requests, seed=a.seed + i), duration_s=a.duration
            )
        name = model if counts[model] == 1 else f"{model}#{i}"
        demands.append(ModelDemand(name, lat, rate, src, SLO(a.ttft, a.tpot)))
    rep = plan_mix(
        demands,
        a.gpus,
        target=a.target,
        tp_options=tuple(int(x) for x in a.tp.split(",")),
        policy=PolicyKind(a.policy),
        block_size=a.block_size,
        verify_top=a.verify,
        progress=not a.quiet,
    )
    print(
        f"{len(demands)} models on {a.gpus} x {a.gpu}, SLO TTFT {a.ttft}s TPOT {a.tpot}s at "
        f"{100 * a.target:.0f}%, workload {a.workload}"
    )
    print(rep.table())
    if a.out:
        out = _out_dir(a)
        assert out is not None
        data = {
            "gpus": a.gpus,
            "headroom": rep.headroom,
            "attainment": rep.verified.attainment if rep.verified is not None else None,
            "models": [
                {
                    "name": c.demand.name,
                    "rate": c.demand.rate,
                    **_entry(c.entry),
                    "headroom": c.headroom,
                    "attainment": next(
                        (r.attainment for r in rep.verified.runs if r.name == c.demand.name), None
                    )
                    if rep.verified is not None
                    else None,
                }
                for c in rep.choices
            ],
        }
        (out / "plan_mix.json").write_text(json.dumps(data, indent=1))
        print(f"wrote {out / 'plan_mix.json'}")
    return 0


def _entry(e) -> dict:
    return {
        "config": e.candidate.label,
        "gpus": e.candidate.num_gpus,
        "goodput": e.rate,
        "per_gpu": e.per_gpu,
        "verified": e.verified,
    }


# --------------------------------------------------------------------------- profile
def cmd_profile(a: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from pdserve.model_setup import resolve_model_path
    from simulator.profile import ProfileGrid, fit, holdout_error, measure_profile, save

    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    path = resolve_model_path(a.model)
    cfg = EngineConfig(device=a.device, dtype=a.dtype, num_kv_blocks=a.kv_blocks)
    grid = (
        ProfileGrid(
            prefill_tokens=(16, 64, 256),
            prefill_batches=(1, 2),
            prefill_contexts=(0,),
            decode_batches=(1, 4, 16),
            decode_contexts=(64, 256),
            repeats=2,
        )
        if a.quick
        else ProfileGrid()
    )
    try:
        prof = measure_profile(
            lambda: LLMEngine.from_pretrained(path, cfg),
            grid,
            progress=not a.quiet,
            model=Path(path).name,
            device=a.device,
            timer=time.process_time if a.cpu_time else time.perf_counter,
        )
    except InvalidRequestError as e:
        if a.kv_blocks is None:
            raise
        # a grid point the pool cannot hold: say which flag, not only the engine's refusal
        raise InvalidRequestError(
            f"the profile's grid does not fit --kv-blocks {a.kv_blocks}: {e}; give more blocks, or leave "
            "--kv-blocks out (the memory budget's)"
        ) from None
    save(prof, a.out)
    f = fit(prof)
    err = holdout_error(prof)
    print(f"wrote {a.out}: {len(prof.points)} points")
    print(f"prefill fit (s): a={f.prefill[0]:.4g} b={f.prefill[1]:.4g}/token c={f.prefill[2]:.4g}/token^2")
    print(f"decode fit (s):  a={f.decode[0]:.4g} b={f.decode[1]:.4g}/ctx-token c={f.decode[2]:.4g}/request")
    print(f"held-out relative error: mean {100 * err.mean:.1f}%  max {100 * err.max:.1f}%  ({err.n} points)")
    return 0


# --------------------------------------------------------------------------- wiring
def register(subparsers) -> None:
    """Add ``simulate``, ``plan``, ``plan-mix``, ``simulate-mix`` and ``profile`` to a ``pdserve``
    argparse sub-parser set."""
    s = subparsers.add_parser(
        "simulate", help="simulate a cluster on a workload (latency, SLO attainment, goodput)"
    )
    _latency_args(s)
    _workload_args(s)
    s.add_argument(
        "--mode",
        default="colocated",
        choices=["colocated", "disaggregated", "splitwise"],
        help="cluster shape: one pool, prefill+decode pools, or Splitwise (prefill, decode, mixed)",
    )
    s.add_argument("--instances", type=int, default=1, help="colocated instances")
    s.add_argument("--prefill", type=int, default=1, help="prefill instances (disaggregated, splitwise)")
    s.add_argument("--decode", type=int, default=1, help="decode instances (disaggregated, splitwise)")
    s.add_argument("--mixed", type=int, default=1, help="splitwise mixed-pool instances")
    s.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree of every instance")
    s.add_argument(
        "--tp-prefill", type=positive_int, default=None, help="TP of prefill instances (default: --tp)"
    )
    s.add_argument(
        "--tp-decode", type=positive_int, default=None, help="TP of decode instances (default: --tp)"
    )
    s.add_argument(
        "--scheduler",
        default="vllm",
        choices=[p.value for p in SchedulerPreset],
        help="colocated/mixed scheduling",
    )
    s.add_argument("--chunk", type=positive_int, default=512, help="Sarathi chunk (token budget)")
    s.add_argument(
        "--policy",
        default=PolicyKind.LEAST_LOADED.value,
        choices=[p.value for p in PolicyKind],
        help="router placement policy",
    )
    s.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching in the instances")
    s.add_argument(
        "--host-pool", default="none", choices=[h.value for h in HostPool], help="per-instance host KV pool"
    )
    s.add_argument(
        "--host-pool-tokens",
        type=int,
        default=0,
        help="host KV pool capacity per instance (--host-pool limited)",
    )
    s.add_argument("--kv-blocks", type=positive_int, default=None, help="override KV blocks per instance")
    s.add_argument(
        "--dispatch-overhead-ms",
        type=float,
        default=0.0,
        help="fixed per-request serving overhead (router/RPC), added between arrival and submission",
    )
    _adapter_args(s)
    _offload_args(s)
    _store_args(s)
    s.add_argument(
        "--rate", type=positive_number, default=None, help="rescale the workload to this mean rate (req/s)"
    )
    s.add_argument("--rates", default=None, help="comma-separated rates: attainment sweep and plots")
    s.add_argument("--goodput", action="store_true", help="also binary-search goodput")
    s.add_argument(
        "--duration", type=positive_seconds, default=60.0, help="seconds of arrivals per goodput simulation"
    )
    s.add_argument("--out", default=None, help="directory for requests.csv, summary.json and PNGs")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_input_errors("simulate", cmd_simulate))

    p = subparsers.add_parser(
        "plan", help="search instance counts and TP per phase for the best goodput per GPU"
    )
    _latency_args(p)
    _workload_args(p)
    p.add_argument("--gpus", type=positive_int, required=True, help="GPU budget")
    p.add_argument("--tp", default="1,2,4,8", help="TP degrees to consider")
    p.add_argument(
        "--policy",
        default=PolicyKind.LEAST_LOADED.value,
        choices=[x.value for x in PolicyKind],
        help="router placement policy of the simulated clusters",
    )
    p.add_argument(
        "--duration", type=positive_seconds, default=60.0, help="seconds of arrivals per simulation"
    )
    p.add_argument("--verify", type=int, default=2, help="top estimates of each kind to simulate whole")
    p.add_argument("--top", type=positive_int, default=5, help="plans of each kind listed in the report")
    p.add_argument(
        "--baseline-engine",
        default="same",
        choices=["same", "vllm"],
        help="colocated baseline latency: same engine, or DistServe's vLLM fits (paper setup; OPT only)",
    )
    p.add_argument("--out", default=None, help="directory to write plan.json into")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_input_errors("plan", cmd_plan))

    m = subparsers.add_parser(
        "plan-mix",
        help="split a GPU budget between several base models, each at its own request rate (#16)",
    )
    m.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="MODEL:RATE",
        help="a model of the mix and the requests/s it must serve, e.g. llama-2-7b:2.0 (repeat per model)",
    )
    m.add_argument("--gpu", default="a100", choices=["a100", "h100"], help="GPU type of the latency models")
    m.add_argument(
        "--latency", default="auto", choices=[s.value for s in LatencySource], help="latency model source"
    )
    m.add_argument(
        "--transfer-gbps",
        type=positive_number,
        default=200.0,
        help="KV transfer bandwidth between instances, Gb/s",
    )
    m.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    _workload_args(m)
    m.add_argument("--gpus", type=positive_int, required=True, help="GPU budget shared by the models")
    m.add_argument("--tp", default="1,2,4,8", help="TP degrees to consider")
    m.add_argument(
        "--policy",
        default=PolicyKind.LEAST_LOADED.value,
        choices=[x.value for x in PolicyKind],
        help="router placement policy of the simulated clusters",
    )
    m.add_argument(
        "--duration", type=positive_seconds, default=60.0, help="seconds of arrivals per simulation"
    )
    m.add_argument(
        "--verify", type=int, default=2, help="top estimates of each kind each model's plan simulates"
    )
    m.add_argument("--out", default=None, help="directory to write plan_mix.json into")
    m.add_argument("--quiet", action="store_true", help="no progress output")
    m.set_defaults(func=_input_errors("plan-mix", cmd_plan_mix))

    x = subparsers.add_parser(
        "simulate-mix",
        help="simulate several base models, each on its own pools, fed from one mixed arrival timeline (#16)",
    )
    x.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="MODEL:POOLS[:RATE]",
        help="a model, its pools (1P2D: 1 prefill + 2 decode instances; 2M: 2 colocated; one GPU each) and, "
        "without --trace, its requests/s, e.g. llama-2-7b:1P1D:2.0 (repeat per model)",
    )
    x.add_argument(
        "--trace",
        default=None,
        help="Mooncake-format JSONL whose lines name their model (field model); default: each model's "
        "ShareGPT-like Poisson arrivals at its rate, merged",
    )
    x.add_argument("--gpu", default="a100", choices=["a100", "h100"], help="GPU type of the latency models")
    x.add_argument(
        "--latency", default="auto", choices=[s.value for s in LatencySource], help="latency model source"
    )
    x.add_argument(
        "--transfer-gbps",
        type=positive_number,
        default=200.0,
        help="KV transfer bandwidth between instances, Gb/s",
    )
    x.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    x.add_argument("--num-requests", type=positive_int, default=None, help="--trace: its first N requests")
    x.add_argument("--seed", type=int, default=0, help="seed of the synthetic arrivals")
    x.add_argument("--ttft", type=positive_seconds, default=0.25, help="TTFT SLO, seconds (every model)")
    x.add_argument("--tpot", type=positive_seconds, default=0.1, help="TPOT SLO, seconds (every model)")
    x.add_argument("--target", type=fraction, default=0.9, help="SLO attainment target")
    x.add_argument(
        "--policy",
        default=PolicyKind.LEAST_LOADED.value,
        choices=[v.value for v in PolicyKind],
        help="router placement policy within each model's pools",
    )
    x.add_argument("--duration", type=positive_seconds, default=60.0, help="seconds of synthetic arrivals")
    x.add_argument("--out", default=None, help="directory to write simulate_mix.json into")
    x.set_defaults(func=_input_errors("simulate-mix", cmd_simulate_mix))

    f = subparsers.add_parser(
        "profile", help="time the real engine on a grid of batches and write a latency profile"
    )
    f.add_argument("--model", default=None, help="HF model folder (default: bundled SmolLM2-135M-Instruct)")
    f.add_argument("--out", default="profile.json", help="profile JSON to write")
    f.add_argument("--device", default="cpu", help="torch device to time (cpu, cuda, cuda:N)")
    f.add_argument(
        "--dtype", default="auto", help="engine dtype (auto: float32 on CPU, the checkpoint's on CUDA)"
    )
    f.add_argument(
        "--kv-blocks",
        type=positive_int,
        default=None,
        help="KV pool in blocks (default: the memory budget's)",
    )
    f.add_argument("--quick", action="store_true", help="a small grid (a minute on a CPU)")
    f.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    f.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by process CPU time instead of wall time (CPUs shared with other work)",
    )
    f.add_argument("--quiet", action="store_true", help="no progress output")
    f.set_defaults(func=_input_errors("profile", cmd_profile))


def build_parser() -> argparse.ArgumentParser:
    """The standalone command line: ``simulate``, ``plan`` and ``profile``."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python -m simulator.cli")
    register(ap.add_subparsers(dest="command", required=True))
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m simulator.cli``) until ``pdserve`` wires :func:`register`."""
    a = build_parser().parse_args(argv)
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
