"""Direct prefill -> decode KV transfer over torch.distributed point-to-point (gloo | NCCL).

One code path for both backends: ``gloo`` moves CPU tensors over TCP, ``nccl`` moves CUDA
tensors (GPU to GPU, NVLink/IB when present); the device follows from the backend
(:func:`device_for`).

Payload: one request's blocks as the engine exports them, a C-contiguous tensor
``[n_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (any dtype; moved as raw
bytes, so float8/bfloat16 need no backend support).

Protocol per transfer, between a sender rank and a receiver rank (P2P ops between one pair are
ordered, so transfers never interleave)::

    sender                                     receiver
    isend(header: 256 bytes)         ----->    recv(header)   request id, dtype, shape;
    isend(payload bytes)             ----->                   checks it against its buffer
                                               recv(payload into out[:n_blocks])
                                                 (a rejected payload goes to a scratch buffer)
    recv(reply: int64)               <-----    send(reply)    ACCEPT or a reject code

Integrity: with CPU tensors (gloo) the header carries the XXH3-64 checksum of the payload bytes
(:mod:`kv_store.checksum`), computed by the sender from the blocks it holds; the receiver
verifies what it received and rejects a mismatch (``REJECT_CHECKSUM``: both sides raise
:class:`~kv_store.checksum.KVChecksumError`, a miss; the received blocks are not used). With CUDA
tensors (NCCL) no checksum is computed (hashing would need a copy to the host); the header says so.

Header and payload are posted back to back (no round trip before the bulk bytes); the reply
confirms delivery, so when :meth:`DistBlockSender.send` returns the receiver holds the blocks
and the sender may free or reuse its tensor. A rejected transfer raises on both sides
(LayoutMismatchError for dtype/shape, ResourceExhaustedError when the receiver's tensor has too
few blocks) and leaves the channel in step for the next transfer (at the cost of moving the
rejected bytes once). An undecodable header leaves the pair out of step: re-create the group.
A dead peer or a timeout raises UnavailableError.

Process group: :func:`init_process_group` with an explicit ``init_method="tcp://HOST:PORT"``
(rank 0 hosts the TCP store). A pair is world size 2 (rank 0 = prefill, rank 1 = decode).
More peers: start one group of ``P + D`` ranks (same ``init_method``, ``world_size=P+D``; say
prefill ranks ``0..P-1``, decode ranks ``P..P+D-1``); any prefill rank sends to any decode rank
with ``send(dst=...)`` / ``recv_into(src=...)``; the router tells each side its peer's rank
(e.g. alongside the KVHandle). Transfers of different pairs run concurrently; NCCL builds one
communicator per pair lazily on its first P2P op. Alternatively ``dist.new_group([p, d])`` per
pair and pass it as ``group``.
"""

from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kv_store.checksum import CHECKSUM_ALGORITHM, KVChecksumError, block_checksum
from pdserve.errors import InvalidRequestError, LayoutMismatchError, ResourceExhaustedError, UnavailableError

HEADER_BYTES = 256
MAGIC = b"PDKV"
VERSION = 2  # 2: flags + payload checksum
MAX_REQUEST_ID_BYTES = 184
BLOCKS_NDIM = 6  # [n_blocks, L, 2, block_size, kv_heads, head_dim]

ACCEPT, REJECT_DTYPE, REJECT_SHAPE, REJECT_CAPACITY, REJECT_HEADER, REJECT_CHECKSUM = 0, 1, 2, 3, 4, 5
_HAS_CHECKSUM = 1  # header flags bit

# dtype <-> 1-byte code on the wire (append only)
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
)
# magic, version, dtype code, ndim, flags, shape, payload checksum, len(request id)
_HEAD = struct.Struct("<4sHBBB6QQH")


@dataclass(frozen=True)
class DistConfig:
    """Where this process sits in the transfer group."""

    rank: int
    world_size: int = 2
    init_method: str = "tcp://127.0.0.1:29500"
    backend: str = "gloo"  # "gloo": CPU tensors; "nccl": CUDA tensors
    timeout_s: float = 60.0
    cuda_device: int | None = None  # nccl: default rank % device_count

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if not self.init_method.startswith("tcp://"):
            raise ValueError(f"init_method must be tcp://HOST:PORT, got {self.init_method!r}")


@dataclass(frozen=True)
class TransferHeader:
    """What a transfer carries: the request, and the blocks tensor's dtype and shape."""

    request_id: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # [n_blocks, L, 2, block_size, kv_heads, head_dim]
    checksum: int | None = None  # XXH3-64 of the payload bytes; None: not computed (CUDA tensors)

    @property
    def n_blocks(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n

    def encode(self) -> bytes:
        rid = self.request_id.encode()
        if len(rid) > MAX_REQUEST_ID_BYTES:
            raise InvalidRequestError(
                f"request id is {len(rid)} bytes; the transfer header carries at most {MAX_REQUEST_ID_BYTES}"
            )
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype} cannot be transferred; use one of {_DTYPES}")
        if len(self.shape) != BLOCKS_NDIM:
            raise InvalidRequestError(f"blocks tensor must be {BLOCKS_NDIM}-D, got shape {self.shape}")
        flags = 0 if self.checksum is None else _HAS_CHECKSUM
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            _DTYPES.index(self.dtype),
            len(self.shape),
            flags,
            *self.shape,
            self.checksum or 0,
            len(rid),
        )
        return (head + rid).ljust(HEADER_BYTES, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> TransferHeader:
        if len(raw) != HEADER_BYTES:
            raise InvalidRequestError(f"transfer header must be {HEADER_BYTES} bytes, got {len(raw)}")
        magic, ver, code, ndim, flags, *rest = _HEAD.unpack_from(raw)
        shape, checksum, rid_len = tuple(rest[:BLOCKS_NDIM]), rest[BLOCKS_NDIM], rest[BLOCKS_NDIM + 1]
        if magic != MAGIC or ver != VERSION or code >= len(_DTYPES) or ndim != BLOCKS_NDIM:
            raise InvalidRequestError(f"malformed transfer header (magic={magic!r}, version={ver})")
        rid = raw[_HEAD.size : _HEAD.size + rid_len].decode()
        return cls(rid, _DTYPES[code], shape, checksum if flags & _HAS_CHECKSUM else None)


def device_for(backend: str, rank: int, cuda_device: int | None = None) -> torch.device:
    """gloo -> CPU; nccl -> ``cuda:cuda_device`` (default ``rank % device_count``)."""
    if backend == "gloo":
        return torch.device("cpu")
    idx = cuda_device if cuda_device is not None else rank % max(1, torch.cuda.device_count())
    return torch.device("cuda", idx)


def init_process_group(config: DistConfig) -> torch.device:
    """Join the default process group (blocks until all ``world_size`` ranks joined); returns
    the device this rank's tensors must be on."""
    device = device_for(config.backend, config.rank, config.cuda_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        kw["device_id"] = device
    dist.init_process_group(
        config.backend,
        init_method=config.init_method,
        rank=config.rank,
        world_size=config.world_size,
        timeout=datetime.timedelta(seconds=config.timeout_s),
        **kw,
    )
    return device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def _check_blocks(t: torch.Tensor, device: torch.device, what: str) -> None:
    if t.dim() != BLOCKS_NDIM:
        raise InvalidRequestError(
            f"{what} must be [n_blocks, L, 2, block_size, kv_heads, head_dim], got shape {tuple(t.shape)}"
        )
    if not t.is_contiguous():
        raise InvalidRequestError(f"{what} must be contiguous (the engine's export format)")
    if t.device.type != device.type:
        raise InvalidRequestError(f"{what} is on {t.device}, this transport moves {device.type} tensors")


def _payload_checksum(t: torch.Tensor) -> int | None:
    """XXH3-64 of a contiguous CPU tensor's bytes; None for device tensors (not computed)."""
    if t.device.type != "cpu":
        return None
    return block_checksum(_bytes_of(t).numpy())


def _reject_error(code: int, header: TransferHeader, out_desc: str) -> Exception:
    if code == REJECT_CHECKSUM:
        return KVChecksumError(
            f"transfer {header.request_id!r}: the received blocks do not match the sender's "
            f"{CHECKSUM_ALGORITHM} checksum ({out_desc}); corrupted in transit, not used"
        )
    if code == REJECT_CAPACITY:
        return ResourceExhaustedError(
            f"transfer {header.request_id!r}: {header.n_blocks} blocks do not fit the receiver's "
            f"buffer ({out_desc}); allocate more blocks"
        )
    if code in (REJECT_DTYPE, REJECT_SHAPE):
        return LayoutMismatchError(
            f"transfer {header.request_id!r}: blocks {header.dtype} {header.shape[1:]} do not match the "
            f"receiver's buffer ({out_desc}); both engines must run the same model, dtype and block size"
        )
    return InvalidRequestError(f"transfer {header.request_id!r} rejected (code {code})")


class _P2P:
    def __init__(self, device: torch.device, group: Any = None) -> None:
        self.device = device
        self.group = group

    def _send(self, t: torch.Tensor, dst: int) -> None:
        try:
            dist.send(t, dst, group=self.group)
        except RuntimeError as e:
            raise UnavailableError(f"send to rank {dst} failed: {e}") from e

    def _recv(self, t: torch.Tensor, src: int) -> None:
        try:
            dist.recv(t, src, group=self.group)
        except RuntimeError as e:
            raise UnavailableError(f"receive from rank {src} failed: {e}") from e


class DistBlockSender(_P2P):
    """Sends a request's blocks tensor to a peer rank (see module docstring for the protocol)."""

    def send(self, dst: int, request_id: str, blocks: torch.Tensor) -> TransferHeader:
        """Send ``blocks`` to rank ``dst``; returns once the receiver confirmed it holds them.
        Raises the receiver's rejection (LayoutMismatchError / ResourceExhaustedError)."""
        _check_blocks(blocks, self.device, "blocks")
        header = TransferHeader(request_id, blocks.dtype, tuple(blocks.shape), _payload_checksum(blocks))
        raw = torch.frombuffer(bytearray(header.encode()), dtype=torch.uint8).to(self.device)
        reply = torch.zeros(1, dtype=torch.int64, device=self.device)
        try:
            reqs = [dist.isend(raw, dst, group=self.group)]
            if header.n_blocks:
                reqs.append(dist.isend(_bytes_of(blocks), dst, group=self.group))
            for r in reqs:
                r.wait()
        except RuntimeError as e:
            raise UnavailableError(f"send to rank {dst} failed: {e}") from e
        self._recv(reply, dst)
        code = int(reply.item())
        if code != ACCEPT:
            raise _reject_error(code, header, f"rejected by rank {dst}")
        return header


class DistBlockReceiver(_P2P):
    """Receives blocks into a preallocated tensor (see module docstring for the protocol)."""

    def recv_into(self, src: int, out: torch.Tensor) -> TransferHeader:
        """Receive one transfer from rank ``src`` into ``out[:n_blocks]`` (``out`` contiguous,
        same dtype and per-block shape, at least ``n_blocks`` blocks). Returns the header."""
        _check_blocks(out, self.device, "receive buffer")
        raw = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        self._recv(raw, src)
        try:
            header = TransferHeader.decode(bytes(raw.cpu().numpy()))
        except InvalidRequestError:
            self._reply(REJECT_HEADER, src)
            raise
        code = ACCEPT
        if header.dtype != out.dtype:
            code = REJECT_DTYPE
        elif header.shape[1:] != tuple(out.shape[1:]):
            code = REJECT_SHAPE
        elif header.n_blocks > out.shape[0]:
            code = REJECT_CAPACITY
        if header.n_blocks:
            if code == ACCEPT:
                dst = _bytes_of(out[: header.n_blocks])
            else:  # drain, so the pair stays in step
                dst = torch.empty(header.nbytes, dtype=torch.uint8, device=self.device)
            self._recv(dst, src)
        if code == ACCEPT and header.checksum is not None and header.n_blocks:
            got = _payload_checksum(out[: header.n_blocks])
            if got is not None and got != header.checksum:
                code = REJECT_CHECKSUM
        self._reply(code, src)
        if code != ACCEPT:
            raise _reject_error(code, header, f"{out.dtype} {tuple(out.shape)}")
        return header

    def _reply(self, code: int, dst: int) -> None:
        self._send(torch.tensor([code], dtype=torch.int64, device=self.device), dst)
