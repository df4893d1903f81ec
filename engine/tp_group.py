"""The communication of one tensor-parallel engine: its ranks, a control channel and the
all-reduce of the sharded layers (I/O seam).

Built straight on a c10d ``TCPStore`` (rank 0 hosts it) with process groups constructed from it,
so it never touches torch.distributed's default group (a worker may also be in the KV-handoff
process group, :mod:`pdserve.worker_main`). ``ctrl`` is always gloo (CPU: pickled commands and
CPU tensors); ``data`` carries the activations: the same gloo group on CPU, NCCL on CUDA.

Contract: :meth:`TPGroup.connect` returns once every rank called it (rank 0 starts its followers
between constructing the group, which opens the store, and connecting). Every collective is
then entered by every rank in the same order (rank 0 drives, the followers mirror it,
:mod:`engine.tp_runner`). An op waits at most ``timeout_s`` (rank 0 keeps an idle group alive
with no-op commands well within it); a rank that dies breaks its peers' ops at once.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


class TPGroup:
    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Rank 0 opens the store on ``host:port`` (0: a free port, see :attr:`port`); the others
        connect to it. The process groups are made by :meth:`connect`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"tensor-parallel rank {rank} not in [0, {world_size})")
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(
            host, port, world_size, rank == 0, timeout=self.timeout, wait_for_workers=False
        )
        self.host, self.port = host, self.store.port
        self.ctrl: Any = None
        self.data: Any = None

    def connect(self) -> TPGroup:
        """Form the groups; blocks until every rank has called it."""
        self.ctrl = dist.ProcessGroupGloo(
            dist.PrefixStore("tp-ctrl", self.store), self.rank, self.world_size, self.timeout
        )
        if self.device.type == "cuda":
            self.data = dist.ProcessGroupNCCL(
                dist.PrefixStore("tp-data", self.store), self.rank, self.world_size
            )
        else:
            self.data = self.ctrl
        return self

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks, in place."""
        self.data.allreduce([t]).wait()

    def broadcast(self, t: torch.Tensor, group: Any | None = None) -> None:
        """Rank 0's ``t`` into every rank's ``t`` (same shape and dtype), in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        (group or self.data).broadcast([t], opts).wait()

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape), in rank order."""
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        self.data.allgather([outs], [t.contiguous()]).wait()
        return outs

    def barrier(self) -> None:
        """Return once every rank got here (a rank that died instead makes it raise)."""
        self.ctrl.allreduce([torch.zeros(1)]).wait()

    def send_obj(self, obj: Any) -> None:
        """Rank 0: broadcast a picklable command (CPU tensors inside are fine)."""
        data = torch.frombuffer(
            bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        self.broadcast(torch.tensor([data.numel()], dtype=torch.long), self.ctrl)
        self.broadcast(data, self.ctrl)

    def recv_obj(self) -> Any:
        """A follower: the next command rank 0 sent with :meth:`send_obj`."""
        n = torch.zeros(1, dtype=torch.long)
        self.broadcast(n, self.ctrl)
        data = torch.empty(int(n.item()), dtype=torch.uint8)
        self.broadcast(data, self.ctrl)
        return pickle.loads(data.numpy().tobytes())
