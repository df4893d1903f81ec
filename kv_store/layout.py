"""KV cache layout: the shape contract between whoever produces KV blocks and whoever consumes them.

Pure: standard library only (the torch helpers live in :mod:`kv_store.tensors`).

Byte layout of ONE block, on the wire and in a store arena slot (the engine produces and
consumes exactly this)::

    for layer in range(num_layers):
        K[layer][block]   # [block_size, num_kv_heads, head_dim], C-contiguous, in `dtype`
        V[layer][block]   # same shape

i.e. one C-contiguous array of shape ``[num_layers, 2, block_size, num_kv_heads, head_dim]``
(native little-endian), taken from the engine's per-layer cache tensors
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` at index ``[:, block_id]``. Hence::

    block_nbytes = num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize(dtype)

A tail block that is only partly filled still occupies (and ships) all ``block_size`` rows; rows
past the handle's ``num_tokens`` are unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pdserve.errors import InvalidRequestError, LayoutMismatchError

# torch dtype name (without "torch.") -> bytes per element
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's paged KV cache; mirrors proto ``pdserve.v1.KVLayout``.

    Construction validates every field and raises :class:`InvalidRequestError` on a bad value,
    so a KVLayout that exists is always usable.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    def __post_init__(self) -> None:
        if not self.model_id:
            raise InvalidRequestError("KV layout: model_id must be non-empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidRequestError(f"KV layout: {name} must be an integer >= 1, got {v!r}")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidRequestError(
                f"KV layout: unsupported dtype {self.dtype!r}; use one of {sorted(DTYPE_ITEMSIZE)}"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's array: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize."""
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def differences(self, other: KVLayout) -> list[str]:
        """``"field: mine != theirs"`` for every differing field (empty when equal)."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def check_compatible(self, other: KVLayout, *, what: str = "KV blocks") -> None:
        """Raise :class:`LayoutMismatchError` naming each differing field, unless equal.

        ``self`` is the expected layout (e.g. the store node's), ``other`` the offered one.
        """
        diff = self.differences(other)
        if diff:
            raise LayoutMismatchError(
                f"{what} have an incompatible KV layout (expected != got): {'; '.join(diff)}. "
                "Blocks can only move between engines running the same model with the same "
                "num_layers, num_kv_heads, head_dim, dtype and block_size."
            )
