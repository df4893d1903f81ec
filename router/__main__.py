"""Router process: ``python -m router --model PATH [--port 0] [--policy KIND]``.

Several base models: ``--model PATH --model PATH2 [--model-id A --model-id B]``: one placement
policy and state per model, requests routed by their ``model`` field (:mod:`router.multi_model`:
an empty model is refused INVALID_ARGUMENT naming the served models, an unknown one NOT_FOUND);
workers of any served model may register, each checked against its model's KV geometry.

``--policy``: goodput (default: each worker's start-up step-time profile calibrates it from the
first request; requests without an SLO are placed best effort, never refused), least_loaded, colocated, random, round_robin, cache_aware (=
global_cache_aware), local_cache_aware. Goodput knobs: ``--latency-profile``, ``--slo-margin``,
``--priority-margin-step``, ``--tenant-max-inflight``, ``--local-prefill-max-tokens``
(0 disables conditional disaggregation), ``--shared-cores N`` (all workers on one N-core host), ``--store`` (KV store for prefix lookups), ``--index``
(the cluster's shared redis:// KV index: prefix lookups read it directly instead of asking a store).
Failover: ``--max-redispatches`` (re-dispatches of one request after lost workers; default 2).
Live migration (Llumnix) between decode workers: ``--migration on|off`` (default on: drains move
running requests off their worker); ``--rebalance-interval-s`` (seconds between rebalancing passes,
0 = off, the default) with ``--rebalance-gap`` (freeness gap, KV blocks per batch slot, that
triggers a load-balancing move), ``--rebalance-max-concurrent``, ``--priority-headroom-blocks``
and ``--high-priority`` (:mod:`router.rebalancer`, :mod:`router.policy.migration`).
Flow control: ``--stall-timeout-s`` (a client that reads nothing for this long is cancelled).
Hung workers (:mod:`router.progress`, :mod:`router.quarantine`): ``--progress-timeout-s`` (a decode
stream with no message for max(this, ``--progress-tpot-factor`` x predicted TPOT) is re-dispatched
and its worker quarantined; 0 disables every progress deadline), ``--first-message-timeout-s``,
``--prefill-timeout-s`` (bounds of a stream's first message and of a Prefill answer),
``--quarantine-probe-interval-s`` / ``--quarantine-probe-timeout-s`` (health probes of
quarantined workers).

Control plane: the worker Registry has its own gRPC server, port (``--control-port``, default any
free one) and threads (:mod:`router.registry_service`), so load on the Generate data plane never
delays heartbeats. Registry is served on the data port too (a worker given only the router's
address registers there and is told the control address for its heartbeats).

Prints one JSON line ``{"address", "control", "metrics"}`` once serving (``address``: the data
plane, Generate, for clients; ``control``: the Registry, for workers' ``--router``; ``metrics``:
host:port of its Prometheus /metrics); runs until SIGTERM. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

from prometheus_client import REGISTRY

from pdserve import cli_help
from pdserve.arg_types import port_number, positive_seconds
from pdserve.auth.cli_args import add_auth_args, edge_from_args
from pdserve.auth.shared_state import (
    SharedEdgeState,
    add_tenant_state_args,
    choose_tenant_state,
    tenant_state_from_args,
)
from pdserve.errors import UnavailableError
from pdserve.gc_tuning import settle_heap
from pdserve.metrics import RouterMetrics, serve_metrics
from pdserve.security import add_process_security_args, install_process_security
from pdserve.tracing import configure_logging
from pdserve.v1 import client_pb2, direct_pb2
from router.admin_service import ADMIN_SERVICE, AdminServicer
from router.drainer import WorkerDrains
from router.health import HEALTH_SERVICES, start_router_health
from router.lifecycle.stream_mode import KVStreamMode
from router.log_buffer import buffer_log_writes
from router.migration_client import MigrationTransport
from router.multi_model import ModelDispatcher, ModelDrains
from router.policy import GoodputConfig, PolicyKind
from router.policy.migration import MigrationConfig
from router.policy_factory import parse_policy, policy_choices
from router.progress import ProgressConfig
from router.quarantine import QuarantineConfig
from router.rebalancer import RebalanceConfig, Rebalancer
from router.registry import Registry
from router.registry_service import REGISTRY_SERVICE, RegistryServicer, start_control_server, worker_verifier
from router.service import GenerateServicer, RouterConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m router`` command line."""
    ap = argparse.ArgumentParser(prog="python -m router")
    ap.add_argument(
        "--model",
        required=True,
        action="append",
        help="HF model folder (tokenizer + config); repeat to serve several base models from this "
        "router (each request then names its model; each model has its own placement state)",
    )
    ap.add_argument(
        "--model-id",
        default=None,
        action="append",
        help="model name clients ask for (default: the folder's name); with several --model, give "
        "one per --model, in the same order, or none",
    )
    ap.add_argument("--host", default="127.0.0.1", help="listen address of the data and control planes")
    ap.add_argument("--port", type=port_number, default=0, help="data plane (Generate) port (0: any free)")
    ap.add_argument(
        "--control-port",
        type=port_number,
        default=0,
        help="control plane (worker Registry: register, heartbeats) port, served by its own threads "
        "(0: any free)",
    )
    ap.add_argument(
        "--heartbeat-timeout-s",
        type=positive_seconds,
        default=3.0,
        help="a worker silent this long is taken out of routing",
    )
    ap.add_argument(
        "--metrics-port", type=port_number, default=0, help="Prometheus /metrics port (0: any free)"
    )
    add_auth_args(ap)
    add_tenant_state_args(ap)  # per-tenant quotas and request ids shared by several routers
    ap.add_argument(
        "--verify-workers",
        choices=["on", "off"],
        default="on",
        help="on: a registering worker is checked against its own Stats and this router's model before "
        "it gets traffic, and only it (its worker token) may heartbeat or deregister; off: workers are "
        "trusted as they register (tests with fake workers only)",
    )
    ap.add_argument(
        "--max-worker-kv-blocks",
        type=int,
        default=None,
        help="refuse a worker that reports more KV blocks than this (default: no bound)",
    )
    ap.add_argument(
        "--policy",
        default=PolicyKind.GOODPUT.value,
        choices=policy_choices(),
        help="placement policy of (prefill, decode) pairs (default goodput: SLO-aware, calibrated by "
        "each worker's start-up profile; least_loaded never refuses work)",
    )
    ap.add_argument(
        "--latency-profile",
        default=None,
        help="pdserve profile JSON seeding latency predictions (default: none, learnt online)",
    )
    ap.add_argument("--store", default=None, help="KV store address for prefix lookups (default: learnt)")
    ap.add_argument(
        "--index",
        default=None,
        metavar="URL",
        help="shared KV index (redis://host:port/db[?prefix=p]) the router reads for prefix lookups",
    )
    ap.add_argument(
        "--max-redispatches",
        type=int,
        default=RouterConfig.max_redispatches,
        help="re-dispatches of one request after its workers are lost (then UNAVAILABLE)",
    )
    ap.add_argument(
        "--direct-streams",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take the router out of the token path for clients that offer it "
        "(GenerateRequest.direct_stream, the SDK's default): their decode worker streams the "
        "tokens to them (proto/pdserve/v1/direct.proto). Default: on for a router serving one "
        "model, off (relayed) for several; --no-direct-streams relays every token",
    )
    ap.add_argument(
        "--kv-stream",
        choices=[m.value for m in KVStreamMode],
        default=RouterConfig.kv_stream.value,
        help="chunk-wise KV streaming: a request's Prefill streams its KV chunk by chunk (grpc: "
        "inline in the prefill worker's StreamKV; store: through its store node; dist: from its "
        "outbox over the workers' torch.distributed group, workers started with --dist-init) while "
        "its Decode, sent at once, assembles it (off: the whole KV after the prefill)",
    )
    ap.add_argument(
        "--kv-stream-chunk-tokens",
        type=int,
        default=RouterConfig.kv_stream_chunk_tokens,
        help="the prefill workers' --chunk, for predictions of a streamed handoff (read only by "
        "--policy goodput with --price-handoff and --kv-stream on)",
    )
    ap.add_argument(
        "--stall-timeout-s",
        type=float,
        default=RouterConfig.stall_timeout_s,
        help="flow control: a client that takes no response for this long (it does not read its "
        "stream) is cancelled with RESOURCE_EXHAUSTED",
    )
    pc, qc = ProgressConfig(), QuarantineConfig()
    ap.add_argument(
        "--progress-timeout-s",
        type=float,
        default=pc.floor_s,
        help="hung workers: a decode stream that sends no message for max(this, "
        "--progress-tpot-factor x predicted TPOT) seconds is cancelled, re-dispatched with the "
        "tokens so far, and its worker quarantined until it answers a health probe "
        "(0: no progress deadlines at all)",
    )
    ap.add_argument(
        "--progress-tpot-factor",
        type=float,
        default=pc.tpot_factor,
        help="hung workers: k of the stream deadline max(floor, k x predicted TPOT x tokens per message)",
    )
    ap.add_argument(
        "--first-message-timeout-s",
        type=float,
        default=pc.first_message_s,
        help="hung workers: bound on a decode stream's first message (KV pull, admission), plus "
        "--prefill-s-per-token per prompt token it prefills itself",
    )
    ap.add_argument(
        "--prefill-timeout-s",
        type=float,
        default=pc.prefill_floor_s,
        help="hung workers: bound on a Prefill answer, at least (max with 5 x predicted TTFT), plus "
        "--prefill-s-per-token per prompt token queued at the worker",
    )
    ap.add_argument(
        "--prefill-s-per-token",
        type=float,
        default=pc.prefill_s_per_token,
        help="hung workers: allowance per queued prompt token added to the prefill bounds",
    )
    ap.add_argument(
        "--quarantine-probe-interval-s",
        type=float,
        default=qc.probe_interval_s,
        help="a quarantined worker is probed (its Stats) this long after it stalled, then at a "
        "doubling interval while probes fail",
    )
    ap.add_argument(
        "--quarantine-probe-timeout-s",
        type=float,
        default=qc.probe_timeout_s,
        help="deadline of one health probe of a quarantined worker",
    )
    g = GoodputConfig()
    ap.add_argument(
        "--slo-margin",
        type=float,
        default=g.slo_margin,
        help="goodput policy: a placement must be predicted to meet the SLO with this fraction to spare",
    )
    ap.add_argument(
        "--priority-margin-step",
        type=float,
        default=g.priority_margin_step,
        help="goodput policy: margin added per priority level above 0 (shed first under load)",
    )
    ap.add_argument(
        "--tenant-max-inflight", type=int, default=None, help="per-tenant in-flight quota (default: none)"
    )
    ap.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=g.local_prefill_max_tokens,
        help="goodput policy: a decode worker may prefill prompts with at most this many uncached "
        "tokens itself (0: always disaggregate)",
    )
    ap.add_argument(
        "--price-handoff",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="goodput policy: add the prefill -> decode KV handoff to a remote prefill's predicted "
        "TTFT (then a short prompt on an idle cluster is prefilled on the decode worker itself; "
        "default off)",
    )
    ap.add_argument(
        "--shared-cores",
        type=int,
        default=None,
        help="goodput policy: every worker runs on one host with this many cores (CPU serving); "
        "predictions grow with busy workers / cores. Default: each worker has its own device",
    )
    ap.add_argument(
        "--log-placement-terms",
        action="store_true",
        help="goodput policy: log each decision's predicted TTFT term by term (queue, fetch, prefill, "
        "co-scheduled decode, speed, contention) with its admission limit ('placement terms' lines)",
    )
    ap.add_argument(
        "--migration",
        default="on",
        help="live migration of running requests between decode workers (drains, rebalancing): on "
        "(default) or off",
    )
    ap.add_argument(
        "--migration-transport",
        default="grpc",
        help="how a live migration's KV moves between decode workers: grpc (default; in the "
        "worker-to-worker stream, any hosts), store (through the source's KV store node, shared "
        "memory on one host) or dist (over the workers' torch.distributed process group, gloo or "
        "NCCL: every decode worker started with --dist-init)",
    )
    ap.add_argument(
        "--rebalance-interval-s",
        type=float,
        default=0.0,
        help="seconds between two rebalancing passes that migrate requests between decode workers "
        "(0: no rebalancing, the default)",
    )
    ap.add_argument(
        "--rebalance-gap",
        type=float,
        default=MigrationConfig.balance_threshold,
        help="rebalancing: freeness gap (free KV blocks per running request) between the least and "
        "the most loaded decode worker that triggers a migration",
    )
    ap.add_argument(
        "--rebalance-defrag-wait-s",
        type=float,
        default=RebalanceConfig.defrag_wait_s,
        help="rebalancing: a request handed to a decode worker that has not started decoding for this "
        "long, and that no decode worker's free KV blocks can hold, gets room made on its worker by "
        "migrating smaller requests off it (de-fragmentation; -1: off)",
    )
    ap.add_argument(
        "--rebalance-max-concurrent",
        type=int,
        default=RebalanceConfig.max_concurrent,
        help="rebalancing: migrations in flight at once, at most",
    )
    ap.add_argument(
        "--priority-headroom-blocks",
        type=int,
        default=0,
        help="rebalancing: KV blocks kept free on a decode worker per high-priority request running "
        "there (lower-priority requests migrate away to keep it)",
    )
    ap.add_argument(
        "--high-priority",
        type=int,
        default=MigrationConfig.high_priority,
        help="requests with priority <= this are high-priority (lower value = more important)",
    )
    add_process_security_args(ap, redis=True)  # TLS, cluster token; the --index / key store Redis
    return cli_help.apply(ap)


def _migration_on(value: str) -> bool:
    """``--migration``: on or off (anything else is refused, naming the flag)."""
    if value not in ("on", "off"):
        raise ValueError(f"--migration must be on or off, got {value!r}")
    return value == "on"


def _rebalance_config(a: argparse.Namespace) -> RebalanceConfig:
    """The rebalancing loop's settings (``ValueError`` names a bad value)."""
    return RebalanceConfig(
        interval_s=a.rebalance_interval_s,
        max_concurrent=a.rebalance_max_concurrent,
        defrag_wait_s=None if a.rebalance_defrag_wait_s < 0 else a.rebalance_defrag_wait_s,
        policy=MigrationConfig(
            balance_threshold=a.rebalance_gap,
            high_priority=a.high_priority,
            priority_headroom_blocks=a.priority_headroom_blocks,
            max_decisions=a.rebalance_max_concurrent,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from pdserve.grpc_server import start_aio_server

    ap = build_parser()
    a = ap.parse_args(argv)
    install_process_security(ap, a, a.host, ("pdserve.v1.Generate", "pdserve.v1.Registry"), redis=True)
    configure_logging("router")
    buffer_log_writes()  # lines leave in 0.1 s batches, warnings at once (#12: per-request CPU)
    try:
        goodput = GoodputConfig(
            slo_margin=a.slo_margin,
            priority_margin_step=a.priority_margin_step,
            tenant_max_inflight=a.tenant_max_inflight,
            local_prefill=a.local_prefill_max_tokens > 0,
            local_prefill_max_tokens=max(0, a.local_prefill_max_tokens),
            shared_cores=a.shared_cores,
            price_handoff=a.price_handoff,
            # the handoff priced into a remote prefill's TTFT: only the last chunk's with --kv-stream
            handoff_chunk_tokens=(
                0 if KVStreamMode.parse(a.kv_stream) is KVStreamMode.OFF else a.kv_stream_chunk_tokens
            ),
        )
        cfgs = _configs(a, goodput)  # one per served model (router.multi_model)
        cfg = cfgs[0]
        _needs_another_flag(ap, a)
        rebalance = _rebalance_config(a)
        if rebalance.interval_s > 0 and not cfg.migration:
            raise ValueError(
                "--rebalance-interval-s > 0 moves requests by live migration: it needs --migration on"
            )
        reg = Registry(cfg.heartbeat_timeout_s, quarantine=_quarantine_config(a))
        edge = edge_from_args(a, cfg.host, "router")  # API keys (none: loopback dev mode only)
        shared = _shared_tenant_state(ap, a)
        if shared is not None:  # quotas and request ids shared with the cluster's other routers
            edge.gate, edge.ids = shared.gate, shared.ids
        metrics = RouterMetrics(REGISTRY, [c.model_id for c in cfgs])  # a model label when several
        multi = len(cfgs) > 1
        # one servicer per model: own tokenizer, placement policy and state (opens the --index)
        servicers = {
            c.model_id: GenerateServicer(reg, c, metrics, edge=edge, track_gauges=not multi) for c in cfgs
        }
        generate = servicers[cfg.model_id]  # the first model's (direct streams: single-model only)
        front: GenerateServicer | ModelDispatcher = generate
        if multi:  # Generate / Tokenize routed by the request's model; ListModels lists them all
            front = ModelDispatcher(servicers)
            front.track_gauges()
        if a.log_placement_terms:
            for svc in servicers.values():
                _log_placement_terms(svc)
        rebalancers = [Rebalancer(svc, rebalance) for svc in servicers.values()]
    except ValueError as e:  # a bad option value (InvalidRequestError included)
        ap.error(str(e))
    verifier = (
        worker_verifier(reg, cfgs, max_kv_blocks=a.max_worker_kv_blocks) if a.verify_workers == "on" else None
    )
    registry_servicer = RegistryServicer(reg, cfg, verifier=verifier)
    control, control_address, _ = start_control_server(registry_servicer, cfg.host, a.control_port)
    server_box: list = []  # the data-plane server, once started (drains run on its loop)
    per_model = {m: WorkerDrains(svc, reg, lambda: server_box[0].loop) for m, svc in servicers.items()}
    drains = per_model[cfg.model_id] if not multi else ModelDrains(reg, per_model)
    admin = AdminServicer(reg, list(servicers), drains=drains)  # type: ignore[arg-type]
    services = [
        (client_pb2.DESCRIPTOR.services_by_name["Generate"], front),
        (REGISTRY_SERVICE, registry_servicer),  # compatibility: registering here names the control port
        (ADMIN_SERVICE, admin),  # operator RPCs (internal: the cluster token)
    ]
    if generate.direct is not None:  # ResumeDirect of direct streams whose worker was lost
        services.append((direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], generate.direct))
    # the data plane on an event loop: a stream costs memory, not a thread (router.service)
    server, port, hs = start_aio_server(
        services, cfg.host, cfg.port, name="router", not_serving=HEALTH_SERVICES
    )
    server_box.append(server)
    # NOT_SERVING until it can place a request (of any of its models)
    health = start_router_health(reg, cfg, hs, model_ids=list(servicers))
    for rebalancer in rebalancers:  # on the data plane's loop, beside the requests it moves
        rebalancer.start(server.loop)
    metrics_port = serve_metrics(a.metrics_port)
    settle_heap()  # start-up is over: full collections walk only what is made from now on (#12)
    print(
        json.dumps(
            {
                "address": f"{cfg.host}:{port}",
                "control": control_address,
                "metrics": f"127.0.0.1:{metrics_port}",
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for rebalancer in rebalancers:
        rebalancer.stop()
    health.stop()
    server.stop(2).wait()
    control.stop(1).wait()
    if shared is not None:
        shared.close()  # releases this router's slots and request ids at once
    return 0


def _shared_tenant_state(ap: argparse.ArgumentParser, a: argparse.Namespace) -> SharedEdgeState | None:
    """The started shared tenant state of ``--tenant-state`` (None: this router's memory); a
    refused choice, goodput's per-router ``--tenant-max-inflight`` beside shared state, or an
    unreachable Redis exits through ``ap.error`` (the first two before anything is started)."""
    try:
        shared_url = choose_tenant_state(a.tenant_state, getattr(a, "index", None), a.cluster_routers).url
        if shared_url and a.tenant_max_inflight:
            ap.error(
                f"--tenant-max-inflight is counted by each of the {a.cluster_routers} routers alone; set "
                "max_inflight on the tenants' API keys instead (shared by the routers through Redis), or "
                "--tenant-state local"
            )
        return tenant_state_from_args(a)
    except (ValueError, UnavailableError) as e:
        ap.error(str(e))


def _log_placement_terms(generate: GenerateServicer) -> None:
    """Log every goodput decision's :class:`~router.policy.goodput.DecisionTrace` (a JSON line
    'placement terms'); ``ValueError`` when the policy is not goodput (it has no terms)."""
    import logging

    from pdserve.tracing import log_event
    from router.policy import GoodputAwarePolicy

    policy = generate.policy
    if not isinstance(policy, GoodputAwarePolicy):
        raise ValueError("--log-placement-terms needs --policy goodput")
    log = logging.getLogger("router.placement")
    policy.on_decision = lambda t: log_event(log, "placement terms", **t.to_dict())


def _needs_another_flag(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``ValueError`` naming the first flag given a value other than its default while the flag
    that turns its feature on is off (the feature would run without it, or not at all): the
    rebalancing knobs without ``--rebalance-interval-s``, ``--migration-transport`` with
    ``--migration off``, ``--kv-stream-chunk-tokens`` with ``--kv-stream off`` or without
    ``--price-handoff``."""
    needs = [
        *(
            (flag, "--rebalance-interval-s > 0 (rebalancing is off)", a.rebalance_interval_s <= 0)
            for flag in (
                "--rebalance-gap",
                "--rebalance-defrag-wait-s",
                "--rebalance-max-concurrent",
                "--priority-headroom-blocks",
                "--high-priority",
            )
        ),
        ("--migration-transport", "--migration on", a.migration == "off"),
        (
            "--kv-stream-chunk-tokens",
            "--kv-stream grpc, store or dist",
            a.kv_stream == KVStreamMode.OFF.value,
        ),
        # the chunk only prices the handoff (GoodputAwarePolicy._handoff_s returns 0 without it)
        ("--kv-stream-chunk-tokens", "--price-handoff", not a.price_handoff),
    ]
    for flag, other, off in needs:
        dest = flag[2:].replace("-", "_")
        if off and getattr(a, dest) != ap.get_default(dest):
            raise ValueError(f"{flag} is read only with {other}: drop {flag}, or turn it on")


def _goodput_only_flags(a: argparse.Namespace) -> None:
    """``ValueError`` naming the first goodput-policy flag given a value other than its default
    while ``--policy`` is another one: only the goodput policy reads them (GoodputConfig), so any
    other policy would run without them (e.g. no per-tenant quota for --tenant-max-inflight)."""
    if parse_policy(a.policy) is PolicyKind.GOODPUT:
        return
    g = GoodputConfig()
    for flag, value, default in (
        ("--slo-margin", a.slo_margin, g.slo_margin),
        ("--priority-margin-step", a.priority_margin_step, g.priority_margin_step),
        ("--tenant-max-inflight", a.tenant_max_inflight, None),
        ("--local-prefill-max-tokens", a.local_prefill_max_tokens, g.local_prefill_max_tokens),
        ("--price-handoff", a.price_handoff, False),
        ("--shared-cores", a.shared_cores, None),
        # it prices a streamed handoff (GoodputConfig.handoff_chunk_tokens): goodput's alone
        ("--kv-stream-chunk-tokens", a.kv_stream_chunk_tokens, RouterConfig.kv_stream_chunk_tokens),
    ):
        if value != default:
            raise ValueError(
                f"{flag} is read by the goodput placement policy only, and --policy is {a.policy}: "
                f"drop {flag}, or use --policy goodput"
            )


def _configs(a: argparse.Namespace, goodput: GoodputConfig) -> list[RouterConfig]:
    """One RouterConfig per ``--model`` (same options, own model path and id); ``ValueError``
    names a bad combination: ``--model-id`` counts that do not match, duplicate ids, the
    options that name one model's things (``--latency-profile``, ``--store``) or that a router
    serving several models does not support (``--direct-streams``), and goodput-policy flags
    under another ``--policy`` (:func:`_goodput_only_flags`)."""
    _goodput_only_flags(a)
    paths = list(a.model)
    ids = list(a.model_id or [])
    if ids and len(ids) != len(paths):
        raise ValueError(f"give one --model-id per --model ({len(paths)}), or none; got {len(ids)}")
    ids = ids or [Path(p).name for p in paths]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the served model ids must be distinct, got {ids}: name them with --model-id")
    if len(paths) > 1:
        for flag, value in (
            ("--latency-profile", a.latency_profile),
            ("--store", a.store),
            ("--direct-streams", a.direct_streams is True),  # the default (None) relays them
        ):
            if value:
                raise ValueError(
                    f"{flag} is not supported on a router serving several models ({', '.join(ids)}): "
                    "run one router per model for it"
                )
    base = _config(a, goodput, paths[0], ids[0])
    if len(paths) > 1:
        base = dataclasses.replace(base, direct_streams=False)
    return [
        base,
        *(
            dataclasses.replace(base, model_path=p, model_id=m)
            for p, m in zip(paths[1:], ids[1:], strict=True)
        ),
    ]


def _config(a: argparse.Namespace, goodput: GoodputConfig, model_path: str, model_id: str) -> RouterConfig:
    """RouterConfig of one model from parsed options (``ValueError`` names a bad value)."""
    return RouterConfig(
        model_path=model_path,
        model_id=model_id,
        host=a.host,
        port=a.port,
        heartbeat_timeout_s=a.heartbeat_timeout_s,
        policy=parse_policy(a.policy),
        goodput=goodput,
        latency_profile=a.latency_profile,
        store_address=a.store,
        index_url=a.index,
        max_redispatches=a.max_redispatches,
        stall_timeout_s=a.stall_timeout_s,
        progress=_progress_config(a),
        migration=_migration_on(a.migration),
        migration_transport=MigrationTransport.parse(a.migration_transport),
        direct_streams=a.direct_streams is not False,  # default on (one model; see _configs)
        kv_stream=KVStreamMode.parse(a.kv_stream),
        kv_stream_chunk_tokens=a.kv_stream_chunk_tokens,
    )


def _progress_config(a: argparse.Namespace) -> ProgressConfig:
    """The progress deadlines from parsed options (``--progress-timeout-s 0``: none)."""
    if a.progress_timeout_s == 0:
        return ProgressConfig(enabled=False)
    return ProgressConfig(
        floor_s=a.progress_timeout_s,
        tpot_factor=a.progress_tpot_factor,
        first_message_s=a.first_message_timeout_s,
        prefill_floor_s=a.prefill_timeout_s,
        prefill_s_per_token=a.prefill_s_per_token,
    )


def _quarantine_config(a: argparse.Namespace) -> QuarantineConfig:
    interval = a.quarantine_probe_interval_s
    return QuarantineConfig(
        probe_interval_s=interval,
        max_probe_interval_s=max(interval, QuarantineConfig.max_probe_interval_s),
        probe_timeout_s=a.quarantine_probe_timeout_s,
    )


if __name__ == "__main__":
    sys.exit(main())
