"""Tensor-parallel execution of one engine: rank 0 drives, followers mirror (I/O seam).

The engine (scheduler, KV block manager, sampler) lives on rank 0 only. Its
:class:`TPModelRunner` holds rank 0's shard (:func:`engine.models.tp_shard.shard_model`) and,
before each collective step, sends the followers the command they must mirror over
:class:`~engine.tp_group.TPGroup`'s control channel:

* ``step``: the flattened batch (token ids, positions, attention metadata); every rank runs the
  forward on its shard and the sharded layers all-reduce their partial sums. Only rank 0
  computes logits and samples (embeddings and ``lm_head`` are replicated).
* ``export``: block ids; every rank takes its KV heads of those blocks and they are all-gathered
  into whole blocks (``[n, L, 2, block_size, kvh, hd]``, heads in rank order) on rank 0.
* ``import``: block ids and whole blocks, broadcast; every rank keeps its heads.
* ``lora_init``: the model type, slot count and slot rank of the engine's LoRA adapters; every
  follower wraps its shard's projections with the same slots (:class:`~engine.lora.shard.LoRAShard`).
* ``lora_slot``: a slot and the whole weights of the adapter rank 0 just wrote there; every
  follower writes its part (column-parallel targets: B's rows of its output columns; row-parallel
  ones: A's columns of its input columns; engine.lora.targets).
* ``step`` also carries each token's adapter slot (None: no adapter in the batch), so every rank
  applies the same adapters to the same rows; row-parallel updates are partial sums added up by
  the layer's all-reduce, like the base output.
* ``noop``: nothing (sent when the engine has been idle for ``KEEPALIVE_S``, so that a
  follower's wait for the next command never reaches the group's op timeout).
* ``stop``: the followers exit.

Each command and its collectives run under one lock, so the keep-alive never interleaves.

Followers are ``spawn``ed child processes of rank 0 (:func:`start_followers`); rank ``r`` uses
``cuda:r`` on GPU (the first ``tp`` visible devices: under Ray, the worker's own GPUs) or the CPU.
A follower exits when its parent dies (checked every second), so a killed worker leaves nothing
behind. A follower that dies first breaks the engine for good: rank 0 notices within a second
(or at once, when a collective fails), every later call raises
:class:`~pdserve.errors.UnavailableError` naming the rank, and ``on_broken(reason)`` is called
once (a worker process uses it to exit, so that its supervisor restarts it whole). The KV layout every other component sees (handles, store, transfers) is the whole
model's: a TP prefill worker hands off to a decode worker of any TP size.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.attention import AttentionMetadata
from engine.block_manager import KVCacheManager
from engine.lora.layers import LoRABatchContext
from engine.lora.shard import AdapterWeights, LoRAShard
from engine.lora.targets import target_map
from engine.model_runner import ModelRunner
from engine.models.llama import LlamaForCausalLM
from engine.tp_group import TPGroup
from pdserve.errors import UnavailableError

if TYPE_CHECKING:
    from engine.lora.manager import LoRAManager

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
KEEPALIVE_S = 300.0  # well under tp_group.DEFAULT_TIMEOUT_S


def md_to(md: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """``md`` with every tensor on ``device``."""

    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return replace(
        md,
        slot_mapping=md.slot_mapping.to(device),
        decode_block_tables=mv(md.decode_block_tables),
        decode_mask=mv(md.decode_mask),
        decode_window_masks={w: m.to(device) for w, m in md.decode_window_masks.items()},
        prefills=[replace(p, block_table=mv(p.block_table)) for p in md.prefills],
        decode_rows=None if md.decode_rows is None else md.decode_rows.to(device),
    )


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:rank`` on GPU, else ``device``."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def cpu_threads_per_rank(world_size: int) -> int:
    """On CPU the ranks share the host's cores: each gets an equal part."""
    return max(1, (os.cpu_count() or 1) // world_size)


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower needs to build its shard (picklable: passed to a spawned process)."""

    model_path: str
    world_size: int
    host: str
    port: int
    num_blocks: int
    block_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    device: str  # rank 0's device type: "cpu" | "cuda"
    max_positions: int | None


def _local_heads(blocks: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    kvh = blocks.shape[4] // world
    return blocks[:, :, :, :, rank * kvh : (rank + 1) * kvh].contiguous()


class TPModelRunner(ModelRunner):
    """Rank 0's :class:`~engine.model_runner.ModelRunner` of a tensor-parallel engine."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KVCacheManager,
        dtype: torch.dtype,
        device: torch.device,
        group: TPGroup,
        followers: list[Any],
        restore_threads: int | None = None,
        on_broken: Callable[[str], None] | None = None,
    ) -> None:
        """``restore_threads``: torch's intra-op thread count to set back on :meth:`close` (the
        engine lowered it so that the ranks share the CPU). ``on_broken``: see module docstring
        (settable later, as an attribute)."""
        super().__init__(
            model, kv, dtype, device, local_kv_heads=model.config.num_key_value_heads // group.world_size
        )
        self.group = group
        self.followers = followers
        self._restore_threads = restore_threads
        self._on_broken = on_broken
        self.broken: str | None = None  # why the group is unusable, once it is
        self._closed = False
        self._lora_ctx: LoRABatchContext | None = None  # set by attach_lora
        self._lock = threading.Lock()  # one command (and its collectives) at a time
        self._state_lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._keepalive, daemon=True, name="tp-keepalive").start()
        atexit.register(self.close)

    def _send(self, cmd: tuple) -> None:
        self.group.send_obj(cmd)
        self._last = time.monotonic()

    def _keepalive(self) -> None:
        """Every second: notice a dead follower; when idle long enough, send a no-op."""
        last_noop_check = time.monotonic()
        while not self._stop.wait(1.0):
            dead = [(r, p) for r, p in enumerate(self.followers, 1) if not p.is_alive()]
            if dead and not self._closed:
                r, p = dead[0]
                self._break(f"tensor-parallel rank {r} of {self.group.world_size} exited (code {p.exitcode})")
                return
            if time.monotonic() - last_noop_check >= KEEPALIVE_S / 4:
                last_noop_check = time.monotonic()
                with self._lock:
                    if (
                        not self._closed
                        and self.broken is None
                        and time.monotonic() - self._last >= KEEPALIVE_S
                    ):
                        self._send(("noop",))

    @property
    def on_broken(self) -> Callable[[str], None] | None:
        return self._on_broken

    @on_broken.setter
    def on_broken(self, callback: Callable[[str], None] | None) -> None:
        """Set the callback; called at once when the group already broke."""
        with self._state_lock:
            self._on_broken = callback
            why = self.broken
        if why is not None and callback is not None:
            callback(why)

    def _break(self, why: str) -> None:
        """Mark the group unusable (once) and tell ``on_broken``."""
        with self._state_lock:
            if self.broken is not None:
                return
            self.broken = why
            callback = self._on_broken
        log.error("%s: the engine cannot run any more; restart the worker", why)
        if callback is not None:
            callback(why)

    def _collective(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a command and its collectives) under the lock; a broken group raises
        UnavailableError (and a failing collective breaks it)."""
        with self._lock:
            if self.broken is not None:
                raise UnavailableError(f"{self.broken}; this worker must be restarted")
            try:
                return fn()
            except RuntimeError as e:  # gloo/NCCL: a peer is gone
                self._break(f"tensor-parallel collective failed: {e}")
                raise UnavailableError(f"{self.broken}; this worker must be restarted") from None

    def attach_lora(self, manager: LoRAManager) -> None:
        """Serve ``manager``'s adapters on every rank: the followers build the same slots, then
        mirror each slot write and each step's slot list (module doc)."""

        def run() -> None:
            self._send(("lora_init", manager.model_type, manager.config.max_loras, manager.rank))
            self.group.barrier()  # every follower wrapped its shard (or the group broke)

        self._collective(run)
        self._lora_ctx = manager.ctx
        manager.on_slot_write = self._lora_slot

    def _lora_slot(self, slot: int, weights: AdapterWeights) -> None:
        self._collective(lambda: self._send(("lora_slot", slot, dict(weights))))

    def forward(self, ids: list[int], pos: list[int], md: AttentionMetadata) -> torch.Tensor:
        ctx = self._lora_ctx
        slots = ctx.slot_per_token if ctx is not None and ctx.active else None

        def run() -> torch.Tensor:
            self._send(("step", ids, pos, md_to(md, CPU), slots))
            return ModelRunner.forward(self, ids, pos, md)

        return self._collective(run)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        def run() -> torch.Tensor:
            self._send(("export", list(block_ids)))
            local = ModelRunner.export_blocks(self, block_ids)
            return torch.cat(self.group.all_gather(local), dim=4).contiguous()

        return self._collective(run)

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        whole = blocks.to(self.device, self.dtype).contiguous()

        def run() -> None:
            self._send(("import", list(block_ids), tuple(whole.shape)))
            self.group.broadcast(whole)
            ModelRunner.import_blocks(self, block_ids, _local_heads(whole, 0, self.group.world_size))

        self._collective(run)

    def close(self) -> None:
        """Stop the followers (idempotent)."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.broken is None:
                try:
                    self._send(("stop",))
                except Exception as e:  # noqa: BLE001 - a follower died: terminate the rest below
                    log.warning("tensor-parallel stop failed: %s", e)
        for p in self.followers:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)


def start_followers(spec: FollowerSpec) -> list[Any]:
    """Spawn ranks ``1..world_size-1`` (they connect to rank 0's store at ``spec.host:port``)."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, spec.world_size):
        p = ctx.Process(target=follower_main, args=(rank, spec), name=f"tp-rank-{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="tp-parent-watch").start()


def follower_main(rank: int, spec: FollowerSpec) -> None:
    """A follower rank: build the shard, then mirror rank 0's commands until ``stop``."""
    from engine.models.loader import load_model
    from engine.models.tp_shard import shard_model

    _exit_with_parent()
    device = rank_device(torch.device(spec.device), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_rank(spec.world_size))
    dtype = getattr(torch, spec.dtype)
    group = TPGroup(rank, spec.world_size, device, spec.host, spec.port).connect()
    model = load_model(Path(spec.model_path), dtype, device, max_positions=spec.max_positions)
    shard_model(model, rank, spec.world_size, group.all_reduce)
    kv = KVCacheManager(spec.num_blocks, spec.block_size, "tp-follower", False)
    runner = ModelRunner(
        model, kv, dtype, device, local_kv_heads=model.config.num_key_value_heads // spec.world_size
    )
    group.barrier()  # ready: rank 0 waits for every shard before it serves
    try:
        _mirror(group, runner, rank, spec, dtype, device)
    except RuntimeError as e:  # gloo/NCCL: a peer closed its connection (rank 0 died or stopped)
        log.warning("tensor-parallel rank %d: the group broke (%s); exiting", rank, e)


def _mirror(
    group: TPGroup,
    runner: ModelRunner,
    rank: int,
    spec: FollowerSpec,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Run rank 0's commands on this follower's shard until ``stop``."""
    lora: LoRAShard | None = None
    with torch.inference_mode():
        while True:
            cmd = group.recv_obj()
            op = cmd[0]
            if op == "step":
                _, ids, pos, md, slots = cmd
                if slots is not None:
                    if lora is None:
                        raise RuntimeError("tensor-parallel step names LoRA slots before lora_init")
                    lora.begin(slots, ids)
                try:
                    runner.forward(ids, pos, md_to(md, device))
                finally:
                    if lora is not None:
                        lora.end()
            elif op == "lora_slot":
                if lora is None:
                    raise RuntimeError("tensor-parallel lora_slot before lora_init")
                lora.write_slot(cmd[1], cmd[2])
            elif op == "lora_init":
                _, model_type, num_slots, slot_rank = cmd
                model = runner.model
                lora = LoRAShard(
                    model,
                    target_map(model, model_type),
                    num_slots,
                    slot_rank,
                    dtype,
                    device,
                    rank,
                    spec.world_size,
                )
                group.barrier()
            elif op == "export":
                group.all_gather(runner.export_blocks(cmd[1]))
            elif op == "import":
                _, ids, shape = cmd
                whole = torch.empty(shape, dtype=dtype, device=device)
                group.broadcast(whole)
                runner.import_blocks(ids, _local_heads(whole, rank, spec.world_size))
            elif op == "stop":
                return
            elif op == "noop":
                continue
            else:  # pragma: no cover - a newer rank 0 than this follower
                raise RuntimeError(f"unknown tensor-parallel command {op!r}")
