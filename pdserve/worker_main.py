"""Process entry of a prefill or decode worker (``python -m prefill_worker`` / ``python -m decode_worker``).

Prints one JSON line ``{"worker_id", "role", "address", "metrics"}`` once serving (``metrics``:
host:port of its Prometheus /metrics), then runs until SIGTERM. Logs are JSON lines on stderr.

Direct KV handoff (``--dist-init tcp://HOST:PORT --dist-rank R --dist-world W
[--dist-backend gloo|nccl]``): every prefill and decode worker of the cluster joins one
torch.distributed process group (prefill ranks ``0..P-1``, decode ranks ``P..P+D-1``; rank 0
hosts the TCP store). The group forms in a background thread (:class:`DistGroup`), so workers
start serving in any order; a transfer waits for it (``--dist-timeout-s``) and fails with a
clear UNAVAILABLE error if it never forms. A prefill worker then keeps its KV in an outbox
(:class:`prefill_worker.dist_outbox.DistPublisher`, ``--dist-outbox-bytes``) and serves the
``KVPeer`` service next to ``Worker``; a decode worker pulls direct handles with
:class:`decode_worker.dist_puller.DistPuller` (store handles still through the store).
gloo moves CPU tensors, nccl CUDA tensors (same code path; the device follows the backend).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import REGISTRY

from engine.config import EngineConfig
from engine.lora import AdapterSpec, LoRAConfig
from engine.scheduler import SchedulingPolicy
from engine.spec_decode.config import DraftAcceptance, SpecMethod, SpeculativeConfig
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.dist_transport import DistConfig, destroy_process_group, device_for, init_process_group
from kv_store.transport import AutoTransport
from pdserve import cli_help, mlfq_knobs, offload_knobs
from pdserve.arg_types import non_negative_int, non_negative_seconds, port_number, positive_int
from pdserve.errors import PdserveError, UnavailableError
from pdserve.gc_tuning import settle_heap
from pdserve.kv_transfer import DEFAULT_DIST_TIMEOUT_S, DEFAULT_OUTBOX_BYTES, DistBackend
from pdserve.metrics import WorkerMetrics, serve_metrics
from pdserve.router_addresses import parse_router_addresses
from pdserve.security import add_process_security_args, install_process_security, internal_channel
from pdserve.tracing import configure_logging, traced_channel
from pdserve.v1 import worker_pb2
from pdserve.worker_base import DEFAULT_STREAM_WINDOW_S, Role, RouterLinks, WorkerConfig, WorkerState

if TYPE_CHECKING:
    from prefill_worker.prefix_policy import PrefixFetchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistOptions:
    """The ``--dist-*`` flags: this worker's place in the workers' process group."""

    init_method: str  # tcp://HOST:PORT (rank 0 hosts the TCP store there)
    rank: int
    world_size: int
    backend: DistBackend = DistBackend.GLOO
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S  # forming the group, and each transfer
    outbox_bytes: int = DEFAULT_OUTBOX_BYTES  # prefill: KV held for pushes, at most
    cuda_device: int | None = None  # nccl: this process's CUDA device (None: rank % device count)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, DistBackend):
            object.__setattr__(self, "backend", DistBackend(self.backend))
        if self.timeout_s <= 0:
            raise ValueError(f"--dist-timeout-s must be > 0, got {self.timeout_s}")
        if self.outbox_bytes <= 0:
            raise ValueError(f"--dist-outbox-bytes must be > 0, got {self.outbox_bytes}")
        self.dist_config()  # validates rank, world size and init method

    def dist_config(self) -> DistConfig:
        return DistConfig(
            rank=self.rank,
            world_size=self.world_size,
            init_method=self.init_method,
            backend=self.backend.value,
            timeout_s=self.timeout_s,
            cuda_device=self.cuda_device,
        )


class DistGroup:
    """Joins the default process group on a background thread (:meth:`start`), so that the
    worker serves while the other ranks start; :meth:`wait_ready` blocks until it is formed.

    ``device`` (gloo: cpu; nccl: cuda) is known at once. A failure to form (a rank never came,
    bad address) is logged and kept: :meth:`wait_ready` raises it as UnavailableError, and
    :attr:`failed` turns True (the prefill side then publishes to the store instead).
    """

    def __init__(self, options: DistOptions) -> None:
        self.options = options
        self.rank = options.rank
        self.world_size = options.world_size
        cfg = options.dist_config()
        self.device = device_for(cfg.backend, cfg.rank, cfg.cuda_device)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DistGroup:
        def run() -> None:
            o = self.options
            try:
                self.device = init_process_group(o.dist_config())
                log.info(
                    "process group formed (rank %d of %d, %s, %s)",
                    o.rank,
                    o.world_size,
                    o.backend.value,
                    self.device,
                )
            except BaseException as e:  # noqa: BLE001 - reported by wait_ready
                self._error = e
                log.error(
                    "process group %s (rank %d of %d, %s) failed to form: %s",
                    o.init_method,
                    o.rank,
                    o.world_size,
                    o.backend.value,
                    e,
                )
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, daemon=True, name="dist-init")
        self._thread.start()
        return self

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait_ready(self, timeout_s: float) -> torch.device:
        """The group's device once formed; UnavailableError if it failed or is not formed within
        ``timeout_s`` seconds."""
        o = self.options
        if not self._done.wait(timeout_s):
            raise UnavailableError(
                f"process group {o.init_method} not formed after {timeout_s:.0f}s (rank {o.rank} of "
                f"{o.world_size}): are all {o.world_size} workers started with the same --dist-init?"
            )
        if self._error is not None:
            raise UnavailableError(
                f"process group {o.init_method} (rank {o.rank} of {o.world_size}, {o.backend.value}) "
                f"failed to form: {self._error}"
            )
        return self.device

    def close(self) -> None:
        if self.ready:
            try:
                destroy_process_group()
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.warning("destroying the process group failed: %s", e)


def dist_parser() -> argparse.ArgumentParser:
    """The ``--dist-*`` flags (direct KV handoff), as a parent parser (no ``-h``)."""
    ap = argparse.ArgumentParser(add_help=False)
    g = ap.add_argument_group("direct KV handoff (one torch.distributed group of all workers)")
    g.add_argument(
        "--dist-init",
        default=None,
        help="tcp://HOST:PORT of the workers' process group (default: none, KV moves through the store)",
    )
    g.add_argument("--dist-rank", type=int, default=None, help="this worker's rank (with --dist-init)")
    g.add_argument("--dist-world", type=int, default=None, help="ranks in the group (with --dist-init)")
    g.add_argument(
        "--dist-backend",
        default=DistBackend.GLOO.value,
        choices=[b.value for b in DistBackend],
        help="gloo moves CPU tensors, nccl CUDA tensors",
    )
    g.add_argument(
        "--dist-timeout-s",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        help="seconds to wait for the group to form, and for each transfer",
    )
    g.add_argument(
        "--dist-outbox-bytes",
        type=int,
        default=DEFAULT_OUTBOX_BYTES,
        help="prefill: KV bytes held for decode workers to pull, at most",
    )
    return ap


def parse_dist_args(argv: list[str]) -> tuple[DistOptions | None, list[str]]:
    """Split the ``--dist-*`` flags off ``argv``: (their options, None without ``--dist-init``;
    the remaining arguments)."""
    ap = dist_parser()
    a, rest = ap.parse_known_args(argv)
    if a.dist_init is None:
        for dest in ("dist_rank", "dist_world", "dist_backend", "dist_timeout_s", "dist_outbox_bytes"):
            if getattr(a, dest) != ap.get_default(dest):  # read with a process group only
                flag = "--" + dest.replace("_", "-")
                ap.error(f"{flag} needs --dist-init tcp://HOST:PORT (without it KV moves through the store)")
        return None, rest
    if a.dist_rank is None or a.dist_world is None:
        ap.error("--dist-init needs --dist-rank and --dist-world")
    try:
        opts = DistOptions(
            init_method=a.dist_init,
            rank=a.dist_rank,
            world_size=a.dist_world,
            backend=DistBackend(a.dist_backend),
            timeout_s=a.dist_timeout_s,
            outbox_bytes=a.dist_outbox_bytes,
        )
    except ValueError as e:
        ap.error(str(e))
    return opts, rest


def build_parser(role: Role, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The ``python -m {prefill,decode}_worker`` command line: the worker flags, the ``--dist-*``
    flags (:func:`dist_parser`) and ``parents`` (e.g. the prefill worker's prefix-policy flags)."""
    ap = argparse.ArgumentParser(
        prog=f"python -m {role.name.lower()}_worker", parents=[dist_parser(), *parents]
    )
    ap.add_argument("--worker-id", required=True, help="this worker's id (unique in the cluster)")
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--store", required=True, help="host:port of the local KV store node")
    ap.add_argument(
        "--router",
        action="append",
        default=None,
        help="host:port of a router's control plane (its ready line's \"control\"; its data address "
        "works too: the router then names its control address). Several routers: a comma-separated "
        "list or the flag repeated; the worker registers and heartbeats with each (default: none, "
        "not registered)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    ap.add_argument("--port", type=port_number, default=0, help="gRPC listen port (0: any free port)")
    ap.add_argument("--kv-blocks", type=positive_int, default=2048, help="KV pool size in blocks")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one engine step, at most")
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens in one engine step, at most")
    ap.add_argument(
        "--chunk",
        type=non_negative_int,
        default=512,
        help="prefill chunk (Sarathi) in tokens (0: only the step's token budget bounds a chunk)",
    )
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size: processes (cuda:0..N-1 on GPU) the model is split over",
    )
    ap.add_argument(
        "--dtype", default="auto", help="weight and KV dtype (auto: float32 on CPU, the checkpoint's on CUDA)"
    )
    ap.add_argument(
        "--admission-timeout-s",
        type=non_negative_seconds,
        default=30.0,
        help="decode: how long a handed-off request may wait for free KV blocks (0: not at all)",
    )
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="decode: tokens per streamed message after the first (1: each token as soon as it is "
        "ready; N: messages of N tokens, about 1/N of the CPU per token at every hop, tokens in bursts)",
    )
    ap.add_argument(
        "--stream-window-ms",
        type=float,
        default=DEFAULT_STREAM_WINDOW_S * 1000.0,
        help="decode: adaptive coalescing: after the first message, at most one message per this "
        "many ms per stream (tokens ready meanwhile go together; a step slower than the window "
        "sends each token at once; 0: off)",
    )
    ap.add_argument(
        "--direct-streams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode: also serve DirectStream (proto/pdserve/v1/direct.proto): clients of a router "
        "with direct streams take their tokens from this worker directly (default: on; "
        "--no-direct-streams: every token relayed by the router). Under mutual TLS it is served on "
        "a port of its own (--direct-port), the worker's port still requiring client certificates",
    )
    ap.add_argument(
        "--direct-port",
        type=int,
        default=0,
        help="decode, under mutual TLS: the DirectStream port (0: any free port; the router learns it "
        "from the worker) (default: %(default)s)",
    )
    ap.add_argument(
        "--swap-space",
        type=float,
        default=0.0,
        metavar="GIB",
        help="host-memory KV pool in GiB behind the device pool (as vLLM's --swap-space): a preempted "
        "request is swapped out and back when cheaper than recomputing it (0: always recompute; "
        "not with --tp > 1) (default: %(default)s)",
    )
    ap.add_argument(
        "--swap-disk",
        type=float,
        default=0.0,
        metavar="GIB",
        help="local-disk KV tier in GiB behind the host pool (needs --swap-space): when the host pool "
        "is full, the swapped-out KV of the coldest requests spills to preallocated, checksummed "
        "segment files instead of a victim recomputing, and comes back before it runs (0: off) "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--swap-disk-dir",
        default=None,
        metavar="DIR",
        help="folder of the --swap-disk segment files (default: the system's temp folder)",
    )
    ap.add_argument(
        "--scheduling-policy",
        choices=[p.value for p in SchedulingPolicy],
        default=SchedulingPolicy.PRIORITY.value,
        help="engine queue order: priority (then arrival), fcfs, or mlfq (FastServe's skip-join "
        "multi-level feedback queue) (default: %(default)s)",
    )
    mlfq_knobs.add_flags(ap, "the engine's")  # --mlfq-num-levels ... --mlfq-preempt-wait-iters
    ap.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        help="speculative decoding by prompt lookup: draft tokens checked per step (1-16; 0: off). "
        "Output is identical to plain decoding; not with --tp > 1 or --lora (README: #17)",
    )
    ap.add_argument(
        "--speculative-ngram",
        type=int,
        default=4,
        help="with --speculative-tokens: the longest n-gram prompt lookup matches (tries n..1)",
    )
    ap.add_argument(
        "--speculative-draft-model",
        default=None,
        metavar="PATH",
        help="with --speculative-tokens: draft with this model folder (same vocabulary and tokenizer "
        "as --model) instead of prompt lookup",
    )
    ap.add_argument(
        "--speculative-acceptance",
        choices=[a.value for a in DraftAcceptance],
        default=DraftAcceptance.COUPLED.value,
        help="with --speculative-draft-model, how sampled requests keep drafts: coupled (output "
        "identical to plain decoding) or rejection (speculative sampling: the target's distribution, "
        "more drafts kept) (default: %(default)s)",
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence (prompt + output tokens) served; default: the model's "
        "max_position_embeddings. Needed e.g. for Phi-3 LongRoPE checkpoints, which are served only "
        "up to original_max_position_embeddings (README: Supported models)",
    )
    ap.add_argument(
        "--weight-dtype",
        choices=["float32", "int8", "bfloat16"],
        default="float32",
        help="how projection and lm_head weights are stored: float32 (as loaded), int8 (weight-only, "
        "per output row; fp32 CPU models, not MoE, --tp 1, no --lora; accuracy: README), bfloat16 "
        "(only on CPUs with native bf16) (default: %(default)s)",
    )
    ap.add_argument(
        "--weight-budget-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory the weights may use, in GiB (FlexGen-style offloading): decoder layers that "
        "do not fit live in host memory or a scratch file and are copied in ahead of use, output "
        "unchanged (not with --tp > 1, --weight-dtype int8 or --lora) (default: all weights resident)",
    )
    offload_knobs.add_flags(ap)  # --weight-host-gib, --weight-offload-dir, --kv-budget-gib, ...
    ap.add_argument(
        "--metrics-port", type=port_number, default=0, help="Prometheus /metrics port (0: any free)"
    )
    lg = ap.add_argument_group("LoRA adapters (multi-LoRA serving, PEFT format)")
    lg.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the PEFT LoRA adapter in folder PATH (adapter_config.json + "
        "adapter_model.safetensors) under NAME: a request's adapter (OpenAI: its model field) names "
        "it; repeatable. A bad adapter fails the start, naming it and the field",
    )
    lg.add_argument(
        "--max-loras",
        type=int,
        default=8,
        help="adapter slots in engine memory: distinct adapters running at once (LRU over idle "
        "slots; more wait) (default: %(default)s)",
    )
    lg.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="rank each slot holds (default: the largest rank among --lora adapters). Alone, "
        "without --lora: a worker that starts with no adapter and takes them at run time "
        "(`pdserve adapters load`)",
    )
    lg.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in host memory (LRU; others re-read from disk when needed) (default: all)",
    )
    add_process_security_args(ap)
    return cli_help.apply(ap)


def parse(
    argv: list[str] | None, role: Role, parents: Sequence[argparse.ArgumentParser] = ()
) -> WorkerConfig:
    """The worker's config from ``argv`` (see :func:`build_parser`; exits with usage on a bad flag)."""
    ap = build_parser(role, parents)
    a = ap.parse_args(argv)
    if a.stream_interval < 1:
        ap.error(f"--stream-interval must be >= 1 (tokens per message), got {a.stream_interval}")
    if not a.stream_window_ms >= 0:
        ap.error(f"--stream-window-ms must be >= 0, got {a.stream_window_ms}")
    try:
        routers = parse_router_addresses(a.router, what="--router") if a.router else ()
    except PdserveError as e:
        ap.error(str(e))
    # TLS / cluster token of this process's server and channels; refused here, before the model loads
    install_process_security(ap, a, a.host, ("pdserve.v1.Worker", "pdserve.v1.KVPeer", "pdserve.v1.KVStream"))
    if a.speculative_tokens < 0:
        ap.error(f"--speculative-tokens must be >= 0 (0: off), got {a.speculative_tokens}")
    if a.speculative_tokens and a.lora:
        ap.error("--speculative-tokens is not supported with --lora (speculative decoding refuses LoRA)")
    if a.speculative_draft_model and not a.speculative_tokens:
        ap.error("--speculative-draft-model needs --speculative-tokens K (the drafts per step)")
    if a.speculative_acceptance != DraftAcceptance.COUPLED.value and not a.speculative_draft_model:
        ap.error("--speculative-acceptance rejection needs --speculative-draft-model")
    if a.speculative_ngram != ap.get_default("speculative_ngram") and (
        not a.speculative_tokens or a.speculative_draft_model
    ):
        ap.error(
            "--speculative-ngram sizes prompt-lookup drafting: it needs --speculative-tokens K and no "
            "--speculative-draft-model"
        )
    if a.max_model_len is not None and a.max_model_len < 1:
        ap.error(f"--max-model-len must be >= 1, got {a.max_model_len}")
    if not (a.swap_space >= 0 and math.isfinite(a.swap_space)):
        ap.error(f"--swap-space must be >= 0 GiB, got {a.swap_space}")
    if not (a.swap_disk >= 0 and math.isfinite(a.swap_disk)):
        ap.error(f"--swap-disk must be >= 0 GiB, got {a.swap_disk}")
    if a.swap_disk and not a.swap_space:
        ap.error("--swap-disk needs --swap-space (the disk tier sits behind the host pool)")
    if a.swap_disk_dir is not None and not a.swap_disk:
        ap.error("--swap-disk-dir needs --swap-disk GIB")
    for why in mlfq_knobs.flag_errors(a, a.scheduling_policy):
        ap.error(why)
    if a.weight_budget_gib is not None and not (
        a.weight_budget_gib >= 0 and math.isfinite(a.weight_budget_gib)
    ):
        ap.error(f"--weight-budget-gib must be >= 0 GiB, got {a.weight_budget_gib}")
    if a.lora and a.weight_budget_gib is not None:
        ap.error("--lora is not supported with --weight-budget-gib (weight offloading)")
    for why in offload_knobs.flag_errors(a, a.scheduling_policy, a.tp):
        ap.error(why)
    if a.lora and a.device_budget_gib is not None:
        ap.error("--lora is not supported with --device-budget-gib (weight offloading)")
    if a.offline_batch and a.speculative_tokens:
        ap.error("--offline-batch is not supported with --speculative-tokens: set one of them")
    try:
        eng = EngineConfig(
            weight_memory_budget_bytes=None
            if a.weight_budget_gib is None
            else int(a.weight_budget_gib * (1 << 30)),
            **offload_knobs.engine_kwargs(offload_knobs.flag_values(a)),
            swap_space_bytes=int(a.swap_space * (1 << 30)),
            swap_disk_bytes=int(a.swap_disk * (1 << 30)),
            swap_disk_dir=a.swap_disk_dir,
            scheduling_policy=SchedulingPolicy(a.scheduling_policy),
            **mlfq_knobs.given(a),
            num_kv_blocks=a.kv_blocks,
            block_size=a.block_size,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_batched_tokens,
            long_prefill_token_threshold=a.chunk,
            device=a.device,
            dtype=a.dtype,
            tensor_parallel_size=a.tp,
            weight_dtype=a.weight_dtype,
            max_model_len=a.max_model_len,
            speculative=SpeculativeConfig(
                method=SpecMethod.DRAFT_MODEL if a.speculative_draft_model else SpecMethod.NGRAM,
                num_speculative_tokens=a.speculative_tokens,
                ngram_max=a.speculative_ngram,
                draft_model=a.speculative_draft_model,
                acceptance=DraftAcceptance(a.speculative_acceptance),
            )
            if a.speculative_tokens
            else None,
        )
    except ValueError as e:  # e.g. swap space with tensor parallelism
        ap.error(str(e))
    lora = None
    if a.lora or a.max_lora_rank is not None:
        try:
            lora = LoRAConfig(
                tuple(AdapterSpec.parse(x) for x in a.lora),
                max_loras=a.max_loras,
                max_lora_rank=a.max_lora_rank,
                max_cpu_loras=a.max_cpu_loras,
            )
        except ValueError as e:
            ap.error(str(e))
    elif a.max_cpu_loras is not None:
        ap.error("--max-cpu-loras needs --lora NAME=PATH or --max-lora-rank R")
    elif a.max_loras != ap.get_default("max_loras"):
        ap.error("--max-loras needs --lora NAME=PATH or --max-lora-rank R")
    return WorkerConfig(
        worker_id=a.worker_id,
        role=role,
        model_path=a.model,
        store_address=a.store,
        host=a.host,
        port=a.port,
        router_addresses=routers,
        engine=eng,
        admission_timeout_s=a.admission_timeout_s,
        stream_interval=a.stream_interval,
        stream_window_s=a.stream_window_ms / 1000.0,
        metrics_port=a.metrics_port,
        lora=lora,
        direct_streams=bool(getattr(a, "direct_streams", False)),
        direct_port=int(getattr(a, "direct_port", 0)),
    )


def build_service(
    state: WorkerState,
    store: KVStoreClient,
    transport: AutoTransport,
    dist: DistGroup | None = None,
    outbox_bytes: int = DEFAULT_OUTBOX_BYTES,
    prefix_fetch: PrefixFetchConfig | None = None,
) -> Any:
    """The Worker servicer of ``state``'s role. With ``dist`` (a direct-handoff worker) a prefill
    servicer publishes to an outbox (store as fallback) and a decode servicer pulls direct
    handles over the process group (store handles through the store); see :func:`worker_services`.
    A decode servicer outside a group (or whose group failed) has direct handles spilled to the
    prefill worker's store (:class:`decode_worker.spill_puller.SpillPuller`).
    ``prefix_fetch``: the prefill servicer's :class:`prefill_worker.prefix_policy.PrefixFetchConfig`
    (None: its defaults)."""
    if state.config.role is Role.PREFILL:
        from prefill_worker.aio_service import AsyncPrefillServicer
        from prefill_worker.publisher import StorePublisher

        publisher: Any = StorePublisher(store)
        if dist is not None:
            from prefill_worker.dist_outbox import DistOutbox, DistPublisher

            outbox = DistOutbox(outbox_bytes)
            outbox.start_sweeper()
            publisher = DistPublisher(outbox, dist, lambda: state.address, fallback=publisher)
        from prefill_worker.prefix_policy import PrefixFetchPolicy

        # served on grpc.aio: see serve_worker
        return AsyncPrefillServicer(state, publisher, store, transport, PrefixFetchPolicy(prefix_fetch))
    from decode_worker.puller import StorePuller
    from decode_worker.service import AsyncDecodeServicer
    from decode_worker.spill_puller import SpillPuller

    puller: Any = SpillPuller(StorePuller(transport, {store.address: store}))
    peer_locks = None
    if dist is not None:
        from decode_worker.dist_puller import DistPuller
        from prefill_worker.dist_outbox import PeerLocks

        # shared with its KVPeer service (live migration's DIST transport sends from here too)
        peer_locks = PeerLocks(shared=True)
        puller = DistPuller(dist, puller, timeout_s=dist.options.timeout_s, locks=peer_locks)
    # served on grpc.aio: see serve_worker
    c = state.config
    svc = AsyncDecodeServicer(
        state, puller, stream_interval=c.stream_interval, stream_window_s=c.stream_window_s
    )
    from prefill_worker.publisher import StorePublisher

    # live migration's STORE transport: this worker puts a migrating request's KV stages on its store
    svc.migration.publisher = StorePublisher(store)
    if dist is not None:
        # live migration's DIST transport: stages wait in this worker's outbox for the
        # destination's pull over the process group (KVPeer, see worker_services)
        from prefill_worker.dist_outbox import DistOutbox, DistPublisher

        outbox = DistOutbox(outbox_bytes)
        outbox.start_sweeper()
        svc.migration.dist_publisher = DistPublisher(
            outbox, dist, lambda: state.address, fallback=svc.migration.publisher
        )
        svc.migration.peer_locks = peer_locks
    return svc


def worker_services(svc: Any, role: Role, dist: DistGroup | None) -> tuple[list[tuple[Any, Any]], Any]:
    """The gRPC services a worker serves, and its KVPeer servicer (None unless it has one):
    ``Worker`` (``svc``, from :func:`build_service`), ``WorkerAdmin`` (adapters loaded at run
    time, :mod:`pdserve.worker_admin`), plus for a worker in a process group
    ``KVPeer``: a prefill worker's shares ``svc``'s outbox and spills to the store ``svc``'s
    publisher falls back to; a decode worker's serves its outgoing live migrations (DIST
    transport) from its migration outbox, under the peer locks its DistPuller receives under."""
    from pdserve.worker_admin import WORKER_ADMIN_SERVICE, WorkerAdminServicer

    services: list[tuple[Any, Any]] = [
        (worker_pb2.DESCRIPTOR.services_by_name["Worker"], svc),
        (WORKER_ADMIN_SERVICE, WorkerAdminServicer(svc.state)),
    ]
    if role is Role.PREFILL:  # chunk-wise KV streaming (prefill_worker/kv_stream.py)
        from prefill_worker.kv_stream_service import KVStreamServicer

        kvs = getattr(svc, "stream_service", None) or KVStreamServicer(svc.streams)  # closed with svc
        services.append((worker_pb2.DESCRIPTOR.services_by_name["KVStream"], kvs))
    if dist is None:
        return services, None
    from prefill_worker.dist_outbox import KVPeerServicer

    # a prefill worker's handoffs, or a decode worker's outgoing live migrations (DIST transport)
    pub = svc.publisher if role is Role.PREFILL else svc.migration.dist_publisher
    peer = KVPeerServicer(
        pub.outbox,
        dist,
        ready_timeout_s=dist.options.timeout_s,
        spill_to=pub.fallback,
        locks=None if role is Role.PREFILL else svc.migration.peer_locks,
    )
    services.append((worker_pb2.DESCRIPTOR.services_by_name["KVPeer"], peer))
    return services, peer


def serve_worker(
    services: list[tuple[Any, Any]], role: Role, host: str, port: int, name: str
) -> tuple[Any, int]:
    """Serve a worker's ``services`` (from :func:`worker_services`); returns (server, bound port).
    Both roles serve on ``grpc.aio`` (:func:`pdserve.grpc_server.start_aio_server`): a decode
    worker's Decode streams and a prefill worker's Prefill calls
    (:mod:`prefill_worker.aio_service`) wait on the engine as tasks of one event loop, not as
    threads of a pool, so a worker's concurrency is its engine's, not a thread cap; so are a
    prefill worker's KVStream reads and KVPeer pushes (their blocking steps on their servicers'
    own threads). The sync methods (Stats, Abort, WorkerAdmin, KVPeer.SpillKV) run on the
    server's threads: a prefill worker keeps as many as its blocking pool. The server stops with
    ``server.stop(grace).wait()``."""
    from pdserve.grpc_server import start_aio_server
    from prefill_worker.aio_service import BLOCKING_THREADS

    threads = BLOCKING_THREADS if role is Role.PREFILL else 4
    server, bound, _ = start_aio_server(services, host, port, name=name, sync_threads=threads)
    return server, bound


def main(
    role: Role,
    argv: list[str] | None = None,
    *,
    prefix_fetch: PrefixFetchConfig | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> int:
    """Run a worker process. ``prefix_fetch``: a prefill worker's
    :class:`prefill_worker.prefix_policy.PrefixFetchConfig` (``python -m prefill_worker`` flags,
    whose parser is passed in ``parents`` so that ``--help`` lists them).

    A model that cannot be loaded ends the process at once with status 1, before the ready line,
    after one ``<prog>: error: cannot load model PATH: <the loader's message>`` line on stderr."""
    dist_opts, rest = parse_dist_args(list(sys.argv[1:] if argv is None else argv))
    cfg = parse(rest, role, parents)
    configure_logging(cfg.worker_id)
    # join the process group while the model loads (the other ranks may start later)
    dist = DistGroup(dist_opts).start() if dist_opts is not None else None
    try:
        state = WorkerState.load(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the loader raised ends the worker, named
        why = str(e) if isinstance(e, PdserveError) else f"{type(e).__name__}: {e}"
        msg = f"cannot load model {cfg.model_path!r}: {why}"
        log.error(msg, exc_info=not isinstance(e, PdserveError))
        print(f"python -m {role.name.lower()}_worker: error: {msg}", file=sys.stderr, flush=True)
        return 1
    # store calls carry the request id as gRPC metadata (pdserve-request-id)
    store_channel = traced_channel(internal_channel(cfg.store_address))
    store = KVStoreClient(cfg.store_address, channel=store_channel)
    transport = AutoTransport(host_id())
    svc = build_service(
        state,
        store,
        transport,
        dist,
        dist_opts.outbox_bytes if dist_opts else DEFAULT_OUTBOX_BYTES,
        prefix_fetch=prefix_fetch,
    )
    services, _ = worker_services(svc, role, dist)
    direct_own_port = False
    if role is Role.DECODE and cfg.direct_streams:
        from decode_worker.direct import enable_direct_streams, needs_own_port

        direct_own_port = needs_own_port()
        ds = enable_direct_streams(svc, services, own_port=direct_own_port)
    server, port = serve_worker(services, role, cfg.host, cfg.port, cfg.worker_id)
    state.address = f"{cfg.host}:{port}"
    direct_port = None  # DirectStream's own port (mutual TLS), else served on the worker's port
    if direct_own_port:
        from decode_worker.direct import serve_direct_port

        direct_port = serve_direct_port(server, ds, cfg.host, cfg.direct_port)
    state.attach_metrics(
        WorkerMetrics(REGISTRY, cfg.worker_id, role.name.lower(), snapshot=state.metrics_snapshot)
    )
    metrics_port = serve_metrics(cfg.metrics_port)
    hb = RouterLinks(state, cfg.router_addresses) if cfg.router_addresses else None
    if hb:
        hb.start()
    settle_heap()  # start-up is over: full collections walk only what is made from now on (#12)
    print(
        json.dumps(
            {
                "worker_id": cfg.worker_id,
                "role": role.name.lower(),
                "address": state.address,
                "metrics": f"127.0.0.1:{metrics_port}",
                **({"direct": direct_port.address} if direct_port is not None else {}),
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    broken: list[str] = []

    def engine_broken(why: str) -> None:  # a tensor-parallel rank died: exit, to be restarted whole
        broken.append(why)
        stop.set()

    state.on_engine_broken(engine_broken)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if hb:
        hb.stop()
    if direct_port is not None:
        direct_port.stop()
    server.stop(2).wait()
    svc.close()  # its admission (decode) or blocking (prefill) threads
    state.close()
    transport.close()
    store.close()
    store_channel.close()
    if dist is not None:
        dist.close()
    if broken:
        log.error("worker %s exits: %s", cfg.worker_id, broken[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Role[sys.argv[1].upper()], sys.argv[2:]))
