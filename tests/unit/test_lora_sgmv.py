"""The native multi-LoRA kernel (engine.lora.sgmv_native) and LoRALinear's use of it (issue #16).

Against a per-token torch reference: random segments, fused modules whose targets write only
their block of the output, sizes that are not multiples of the vector width, rows in any order,
base rows untouched. A row's update is bitwise the same alone or in any mixed batch. Bad index
data is refused before the kernel reads it. LoRALinear's native path == its torch path on every
batch layout, and the batch context reuses its layout while the slot list is unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.lora import sgmv_native as sn
from engine.lora.layers import LoRABatchContext, LoRALinear

pytestmark = pytest.mark.skipif(not sn.available(), reason=f"no C compiler: {sn.unavailable_reason()}")

S, R = 5, 4


def slot_weights(
    fin: int, cols: list[tuple[int, int]], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot buffers like LoRAShard.write_slot makes: target j's rank rows j*R.. of A, and of B
    only inside its columns (block diagonal)."""
    fout = max(c0 + cn for c0, cn in cols)
    a = torch.zeros(S, len(cols) * R, fin)
    b = torch.zeros(S, len(cols) * R, fout)
    for j, (c0, cn) in enumerate(cols):
        a[:, j * R : (j + 1) * R] = torch.randn(S, R, fin, generator=g)
        b[:, j * R : (j + 1) * R, c0 : c0 + cn] = torch.randn(S, R, cn, generator=g)
    return a, b


def index(slot_per_row: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, segments) grouping the rows by slot (-1: no adapter)."""
    rows, segs = [], []
    for s in sorted({s for s in slot_per_row if s >= 0}):
        lo = len(rows)
        rows += [i for i, t in enumerate(slot_per_row) if t == s]
        segs.append((s, lo, len(rows)))
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(segs, dtype=torch.int64).reshape(-1, 3)


def reference(out, x, a, b, slot_per_row):  # noqa: ANN001, ANN201
    want = out.clone().double()
    for t, s in enumerate(slot_per_row):
        if s >= 0:
            want[t] += (x[t].double() @ a[s].double().t()) @ b[s].double()
    return want


@pytest.mark.parametrize(
    "fin,cols",
    [
        (64, [(0, 64), (64, 16), (80, 16)]),  # fused q/k/v
        (37, [(0, 50), (50, 50)]),  # fused gate/up, odd sizes
        (96, [(0, 17)]),  # one target, tail columns
        (33, [(5, 20)]),  # a target that writes only part of the output
    ],
)
def test_kernel_matches_per_token_reference(fin: int, cols: list[tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(fin)
    a, b = slot_weights(fin, cols, g)
    slots = [3, -1, 0, 3, 1, -1, 4, 0, 0, 2, 3, -1]
    x = torch.randn(len(slots), fin, generator=g)
    out = torch.randn(len(slots), b.shape[2], generator=g)
    rows, segs = index(slots)
    want = reference(out, x, a, b, slots)
    got = sn.sgmv_add(out.clone(), x, a, b, rows, segs, sn.targets_table(len(cols), R, cols))
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], out[base_rows])  # base-model rows untouched


def test_a_row_is_bitwise_the_same_alone_or_in_any_batch() -> None:
    g = torch.Generator().manual_seed(1)
    cols = [(0, 80), (80, 48)]
    a, b = slot_weights(72, cols, g)
    tg = sn.targets_table(2, R, cols)
    slots = [2, 0, 2, 1, 4, 2, 3, 0, 2, 2, 0]  # segments of 5 (4 + 1), 3, 1 tokens: every block size
    x = torch.randn(len(slots), 72, generator=g)
    out = torch.randn(len(slots), 128, generator=g)
    rows, segs = index(slots)
    mixed = sn.sgmv_add(out.clone(), x, a, b, rows, segs, tg)
    for t, s in enumerate(slots):
        one = sn.sgmv_add(out[t : t + 1].clone(), x[t : t + 1], a, b, *index([s]), tg)
        assert torch.equal(one[0], mixed[t]), t


def test_bad_index_or_data_refused_naming_it() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = slot_weights(16, [(0, 16)], g)
    tg = sn.targets_table(1, R, [(0, 16)])
    x, out = torch.randn(3, 16), torch.zeros(3, 16)
    rows = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="segment"):
        sn.sgmv_add(out, x, a, b, rows, torch.tensor([[S, 0, 3]]), tg)  # slot out of range
    with pytest.raises(ValueError, match="segment"):
        sn.sgmv_add(out, x, a, b, rows, torch.tensor([[0, 0, 4]]), tg)  # past the rows
    with pytest.raises(ValueError, match="rows"):
        sn.sgmv_add(out, x, a, b, torch.tensor([0, 1, 3]), torch.tensor([[0, 0, 3]]), tg)
    with pytest.raises(ValueError, match="target"):
        sn.sgmv_add(out, x, a, b, rows, torch.tensor([[0, 0, 3]]), sn.targets_table(1, R, [(8, 16)]))
    with pytest.raises(ValueError, match="x must be torch.float32"):
        sn.sgmv_add(out, x.double(), a, b, rows, torch.tensor([[0, 0, 3]]), tg)
    with pytest.raises(ValueError, match="do not fit"):
        sn.sgmv_add(torch.zeros(3, 8), x, a, b, rows, torch.tensor([[0, 0, 3]]), tg)
    with pytest.raises(ValueError, match="column ranges"):
        sn.targets_table(2, R, [(0, 16)])


def lora_linear(fin: int, cols: list[tuple[int, int]], seed: int) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    fout = max(c0 + cn for c0, cn in cols)
    base = nn.Linear(fin, fout, bias=True)
    m = LoRALinear(base, LoRABatchContext(), S, len(cols), R, torch.float32, torch.device("cpu"), cols)
    a, b = slot_weights(fin, cols, g)
    m.lora_a.copy_(a)
    m.lora_b.copy_(b)
    return m


@pytest.mark.parametrize(
    "slots",
    [
        [1, 1, 1, 1],  # one adapter, the whole batch (torch: one addmm)
        [-1, 2, 2, 0, 0, 0, -1],  # grouped runs with base rows (torch: row ranges)
        [3, 0, 3, -1, 0, 4, 3],  # interleaved (torch: permutation)
        [-1, -1],  # no adapter: inactive
    ],
)
def test_lora_linear_native_equals_torch_path(slots: list[int]) -> None:
    m = lora_linear(40, [(0, 24), (24, 24)], 3)
    x = torch.randn(len(slots), 40, generator=torch.Generator().manual_seed(4))
    m.ctx.set(slots, list(range(len(slots))), torch.device("cpu"))
    with torch.inference_mode():
        m.native = True
        got = m(x)
        m.native = False
        want = m(x)
    assert torch.allclose(got, want, atol=1e-5), slots
    assert torch.allclose(
        got.double(), reference(m.base(x).detach(), x, m.lora_a, m.lora_b, slots), atol=1e-4
    )


def test_context_layout_reused_while_the_slot_list_is_unchanged() -> None:
    m = lora_linear(16, [(0, 16)], 5)
    ctx, cpu = m.ctx, torch.device("cpu")
    ctx.set([2, 0, 2], [7, 8, 9], cpu)
    rows, segs, top = ctx.native_index()
    perm = ctx.perm
    ctx.clear()
    assert not ctx.active
    ctx.set([2, 0, 2], [10, 11, 12], cpu)  # next decode step, same requests
    assert ctx.active and ctx.perm is perm and ctx.expected_ids == [10, 11, 12]
    assert ctx.native_index()[0] is rows
    assert rows.tolist() == [1, 0, 2] and segs.tolist() == [[0, 0, 1], [2, 1, 3]] and top == 2
    ctx.set([2, 1], [1, 2], cpu)  # the batch changed: rebuilt
    rows2, segs2, _ = ctx.native_index()
    assert rows2.tolist() == [0, 1] and segs2.tolist() == [[2, 0, 1], [1, 1, 2]]
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="LoRA context of 2 tokens"):
        m(x)  # a forward of another size than the context's batch
