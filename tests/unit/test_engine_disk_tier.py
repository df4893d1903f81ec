"""Cold KV on disk in the real engine (tiny random Llama, fp32, CPU): under memory pressure with
many requests, swapped-out KV spills from a small host pool to the disk tier and comes back
(disk -> host -> device) with exactly the tokens of an unpreempted run; a corrupt or truncated
segment file, a failing disk write and a full disk tier all fall back to recompute (identical
output, counted in the stats), and no block leaks on any tier."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulingPolicy

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
BLOCK_NBYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32
DEVICE_BLOCKS = 12  # 16 requests growing to ~4 blocks each: many preemptions
HOST_BLOCKS = 6  # a couple of swapped-out requests fill it: the colder ones spill to disk


def _prompts(n: int = 16, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(10, 40, (n,), generator=g).tolist()
    return [torch.randint(3, 320, (k,), generator=g).tolist() for k in lens]


def _engine(path, tmp, **kw) -> LLMEngine:
    base = dict(
        num_kv_blocks=DEVICE_BLOCKS,
        block_size=16,
        max_num_batched_tokens=256,
        swap_space_bytes=HOST_BLOCKS * BLOCK_NBYTES,
        swap_disk_bytes=256 * BLOCK_NBYTES,
        swap_disk_dir=str(tmp),
    )
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


def _after_each_step(eng: LLMEngine, hook) -> None:
    orig = eng.step

    def step():
        out = orig()
        hook(eng)
        return out

    eng.step = step  # generate() calls self.step


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def reference(llama):
    """Every prompt in one roomy engine (never preempted)."""
    eng = LLMEngine.from_pretrained(llama, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256))
    return [o.token_ids for o in eng.generate(_prompts(), GREEDY)]


def _assert_no_leaks(eng: LLMEngine) -> None:
    assert not eng.has_unfinished()
    assert eng.kv.num_free_blocks == DEVICE_BLOCKS
    assert eng.kv.num_free_host_blocks == eng.kv.num_host_blocks
    assert eng.kv.num_free_disk_blocks == eng.kv.num_disk_blocks
    st = eng.stats()
    assert st.num_swapped == 0 and st.disk_blocks_used == 0 and st.host_blocks_used == 0


def _corrupt_disk_blocks(eng: LLMEngine, how: str) -> int:
    """Damage the segment file under every block that is on disk now; returns how many."""
    tier = eng.disk_tier
    assert tier is not None
    slots = [d for r in eng.scheduler.swapped for d in eng.kv.disk_ids_of(r.request_id)]
    for d in slots:
        path, off = tier.location(d)
        if how == "truncate":
            os.truncate(path, off)
        else:
            with open(path, "r+b") as f:
                f.seek(off + 100)
                f.write(b"\xa5" * 64)
    return len(slots)


def test_spill_to_disk_and_back_identical_under_memory_pressure(llama, reference, tmp_path):
    eng = _engine(llama, tmp_path)
    assert eng.kv.num_disk_blocks == 256 and eng.rates.disk_bytes_per_s is not None  # measured at start
    assert len(eng.disk_tier.paths) == 1 and eng.disk_tier.paths[0].stat().st_size == 256 * BLOCK_NBYTES
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.disk_spills > 0 and st.disk_promotions > 0
    assert st.disk_spilled_blocks == st.disk_promoted_blocks > 0
    assert st.num_swap_ins == st.num_swap_outs and st.disk_fallbacks == 0 and st.disk_enabled
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng)
    paths = list(eng.disk_tier.paths)
    eng.close()
    assert not any(p.exists() for p in paths)  # scratch segments removed


def test_seeded_sampling_identical_through_disk(llama, tmp_path):
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(16)]
    roomy = LLMEngine.from_pretrained(llama, EngineConfig(num_kv_blocks=256)).generate(_prompts(), params)
    eng = _engine(llama, tmp_path)
    tight = eng.generate(_prompts(), params)
    assert eng.stats().disk_promotions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    _assert_no_leaks(eng)


def test_mlfq_with_disk_tier_identical(llama, reference, tmp_path):
    eng = _engine(
        llama,
        tmp_path,
        scheduling_policy=SchedulingPolicy.MLFQ,
        mlfq_quantum_iters=2,
        mlfq_base_prefill_s=1e-4,
        max_num_seqs=4,
    )
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.num_swap_outs > 0 and st.disk_spills > 0
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng)


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_corrupt_or_truncated_segment_recomputes(llama, reference, tmp_path, how):
    eng = _engine(llama, tmp_path)
    damaged = []

    def hook(e: LLMEngine) -> None:
        if not damaged and e.kv.num_free_disk_blocks < e.kv.num_disk_blocks:
            damaged.append(_corrupt_disk_blocks(e, how))

    _after_each_step(eng, hook)
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert damaged and damaged[0] > 0
    assert st.disk_corrupt_blocks >= 1 and st.disk_fallbacks >= 1  # never served: recomputed
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng)


def test_failing_disk_write_recomputes_and_stops_spilling(llama, reference, tmp_path):
    eng = _engine(llama, tmp_path)
    tier = eng.disk_tier

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    tier._pwrite = full  # the write seam: the disk fills up under the engine
    spills_when_off: list[int] = []

    def hook(e: LLMEngine) -> None:
        if not spills_when_off and not e.scheduler.disk_enabled:
            spills_when_off.append(e.scheduler.num_spills)

    _after_each_step(eng, hook)
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.disk_write_errors >= 1 and st.disk_fallbacks >= 1
    assert not st.disk_enabled and spills_when_off == [st.disk_spills]  # the first failure: no more spills
    assert st.disk_promotions == 0
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng)


def test_full_disk_tier_recomputes(llama, reference, tmp_path):
    # a disk tier of one block cannot take any request's blocks: the victims recompute instead
    eng = _engine(llama, tmp_path, swap_disk_bytes=BLOCK_NBYTES)
    outs = eng.generate(_prompts(), GREEDY)
    st = eng.stats()
    assert st.disk_full > 0 and st.num_preemptions > st.num_swap_outs
    assert [o.token_ids for o in outs] == reference
    _assert_no_leaks(eng)


def test_abort_while_on_disk_frees_every_tier(llama, tmp_path):
    eng = _engine(llama, tmp_path)
    ids = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts())]
    on_disk: list[str] = []
    for _ in range(400):
        eng.step()
        on_disk = [r.request_id for r in eng.scheduler.swapped if eng.kv.disk_ids_of(r.request_id)]
        if on_disk:
            break
    assert on_disk, "no request reached the disk tier"
    for rid in ids:
        if eng.has_request(rid):
            eng.abort(rid)
    _assert_no_leaks(eng)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(swap_disk_bytes=1 << 20), "needs a host swap pool"),
        (dict(swap_space_bytes=1 << 20, swap_disk_dir="/tmp"), "swap_disk_dir needs a disk tier"),
        (dict(swap_space_bytes=1 << 20, swap_disk_bytes=-1), "swap_disk_bytes must be >= 0"),
    ],
)
def test_bad_disk_tier_config_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_disk_tier_smaller_than_a_block_or_unwritable_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="holds no KV block"):
        _engine(llama, tmp_path, swap_disk_bytes=BLOCK_NBYTES - 1)
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(ValueError, match="cannot create .* segment files in .*no/such/dir"):
        _engine(llama, missing)
