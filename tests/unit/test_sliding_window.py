"""Sliding-window attention over the paged KV cache (engine/attention.py, block_manager.py,
model_runner.py, llm_engine.py) against transformers and against its own invariants.

* Paged windowed attention == dense attention with HF's mask (``i - j < W``), also with block
  tables trimmed past freed blocks.
* KV manager: blocks wholly out of the window are dropped (a block another request shares stays;
  a freed hashed block stays findable in the prefix cache), a windowed prefix hit needs only the
  window before the hit, imports adopt only in-window blocks.
* Engine vs HF on the tiny Mistral (every layer windowed, window 24) and Qwen2 (layer 0 full,
  layer 1 windowed): chunked prefill, prefix-cache hits, block sizes 8 and 16; the engine-level
  KV handoff (prefill_only + export_kv -> import_kv) == whole; a long windowed sequence holds a
  bounded number of blocks and leaks none.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, PrefillSlice, paged_attention
from engine.block_manager import NULL_BLOCK, KVCacheManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.tiny_models import SLIDING_WINDOW

W = SLIDING_WINDOW
TOL = 1e-3
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


def _hf_ref(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None
    )
    gen = out[0][len(ids) :].tolist()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0].float(), -1)
    return gen, torch.stack([lp[len(ids) - 1 + j, t] for j, t in enumerate(gen)])


def _check(out, ref) -> None:
    gen, lps = ref
    assert out.token_ids == gen
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    assert torch.allclose(ours, lps, atol=TOL), (ours - lps).abs().max()


# ------------------------------------------------------------------ attention kernel


def _dense_window(q, k, v, q_start: int, window: int | None):
    h, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    qp = torch.arange(q.shape[0])[:, None] + q_start
    kp = torch.arange(k.shape[0])[None, :]
    mask = kp <= qp
    if window is not None:
        mask &= qp - kp < window  # transformers' sliding_window_overlay
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)


@pytest.mark.parametrize("trim", [False, True])
def test_windowed_paged_attention_equals_dense(trim: bool) -> None:
    """Decodes, a fresh prefill longer than the window and a continued chunk, with tables that
    start at position 0 or (trim) at the first block still inside the window."""
    torch.manual_seed(0)
    H, KVH, D, BS, NB, win = 4, 2, 8, 4, 96, 6
    cache = torch.randn(2, NB, BS, KVH, D) * 100  # stale (finite) data: masked slots may hold it
    perm = torch.randperm(NB).tolist()
    seqs = [(20, 1), (13, 1), (0, 11), (17, 9)]  # (cached tokens, new tokens)
    full_k, full_v, tables = [], [], []
    for ctx, new in seqs:
        n = ctx + new
        full_k.append(torch.randn(n, KVH, D))
        full_v.append(torch.randn(n, KVH, D))
        tables.append([perm.pop() for _ in range(-(-n // BS))])
    for (ctx, _), k, v, t in zip(seqs, full_k, full_v, tables, strict=True):
        first = max(0, ctx - win + 1) // BS if trim else 0
        for b in t[:first]:  # trimmed: blocks before `first` were freed: NaN, so any read shows
            cache[:, b] = float("nan")
        for p in range(first * BS, ctx):
            cache[0, t[p // BS], p % BS] = k[p]
            cache[1, t[p // BS], p % BS] = v[p]
    qs, ks, vs, slots = [], [], [], []
    for (ctx, new), k, v, t in zip(seqs, full_k, full_v, tables, strict=True):
        qs.append(torch.randn(new, H, D))
        ks.append(k[ctx:])
        vs.append(v[ctx:])
        slots += [t[p // BS] * BS + p % BS for p in range(ctx, ctx + new)]
    firsts = [max(0, ctx - win + 1) // BS if trim else 0 for ctx, _ in seqs]
    dec = [t[f:] for t, f in zip(tables[:2], firsts[:2], strict=True)]
    width = max(len(t) for t in dec)
    lens = torch.tensor([21, 14])[:, None]
    kpos = torch.arange(width * BS)[None] + torch.tensor([f * BS for f in firsts[:2]])[:, None]
    pad_block = tables[2][0]  # padding columns point at a real block and are masked out
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decodes=2,
        decode_block_tables=torch.tensor([t + [pad_block] * (width - len(t)) for t in dec]),
        decode_mask=(kpos < lens)[:, None, None, :],
        prefills=[
            PrefillSlice(2, 11, 0, None),
            PrefillSlice(13, 9, 17, torch.tensor(tables[3][firsts[3] :]), firsts[3] * BS),
        ],
        block_size=BS,
        decode_window_masks={win: ((kpos < lens) & (kpos >= lens - win))[:, None, None, :]},
        trimmed=trim,
    )
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, md, D**-0.5, window=win)
    assert not out.isnan().any()
    off = 0
    for (ctx, new), q, k, v in zip(seqs, qs, full_k, full_v, strict=True):
        torch.testing.assert_close(
            out[off : off + new], _dense_window(q, k, v, ctx, win), atol=1e-5, rtol=1e-5
        )
        off += new
    if trim:  # a full-attention layer must refuse tables trimmed to a window
        with pytest.raises(RuntimeError, match="trimmed"):
            paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, md, D**-0.5, window=None)


# ------------------------------------------------------------------ KV manager


def _req(rid: str, n: int, prefill_only: bool = False, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(), prefill_only=prefill_only)


def _step(kv: KVCacheManager, req: Request, n: int) -> None:
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens += n
    kv.cache_blocks(req)


def _check_pool(kv: KVCacheManager) -> None:
    refs = sum(b.ref_cnt for b in kv.pool.blocks)
    assert kv.num_free_blocks + sum(1 for b in kv.pool.blocks if b.ref_cnt > 0) == kv.num_blocks
    assert all(b.ref_cnt >= 0 for b in kv.pool.blocks) and refs >= kv.num_used_blocks


def test_blocks_out_of_the_window_are_dropped_and_reusable() -> None:
    bs, win = 4, 6
    kv = KVCacheManager(32, bs, "m", sliding_window=win)
    r = _req("a", 30)
    _step(kv, r, 9)  # 9 tokens in: queries from 9 on attend to keys > 3 -> block 0 (0..3) is done
    assert kv.block_table("a")[0] != NULL_BLOCK  # dropped lazily, at the next allocation
    _step(kv, r, 1)
    assert kv.block_table("a")[0] == NULL_BLOCK and kv.num_held_blocks("a") == 2
    first = kv.pool.blocks[0]
    assert first.ref_cnt == 0 and first.block_hash is not None  # free, still in the prefix cache
    for _ in range(15):
        _step(kv, r, 1)
        assert kv.num_held_blocks("a") <= win // bs + 2
        _check_pool(kv)
    held = kv.num_held_blocks("a")
    kv.free("a")
    assert kv.num_used_blocks == 0 and held > 0


def test_a_shared_block_stays_with_the_request_still_using_it() -> None:
    bs, win = 4, 6
    kv = KVCacheManager(32, bs, "m", sliding_window=win)
    a = _req("a", 40)
    _step(kv, a, 12)
    b = _req("b", 40)  # same tokens: hits a's blocks
    hit = kv.find_cached_prefix(b)
    # a hit of 3 blocks (12 tokens): queries from 12 on attend to keys > 6: block 0 not needed
    assert len(hit) == 3 and hit[0] is None and None not in hit[1:]
    shared = kv.block_table("a")[1]
    assert kv.allocate_slots(b, 4, hit)
    b.num_computed_tokens = 12
    assert kv.block_table("b")[:2] == [NULL_BLOCK, shared]
    assert kv.pool.blocks[shared].ref_cnt == 2
    _step(kv, a, 1)
    _step(kv, a, 1)  # allocated with 13 computed: keys > 7 needed, a drops blocks 0 and 1
    assert kv.block_table("a")[:2] == [NULL_BLOCK, NULL_BLOCK]
    assert kv.pool.blocks[shared].ref_cnt == 1  # b still holds it
    kv.free("a")
    kv.free("b")
    assert kv.num_used_blocks == 0
    _check_pool(kv)


def test_windowed_prefix_hit_needs_only_the_window_before_it() -> None:
    bs, win = 4, 6
    kv = KVCacheManager(64, bs, "m", sliding_window=win)
    a = _req("a", 41)
    _step(kv, a, 40)
    kv.free("a")
    # evict block 0 and 1 from the cache: a full-prefix lookup would now miss everything
    for i in (0, 1):
        blk = kv.pool.blocks[kv.pool.lookup(a.block_hashes[i]).block_id]
        del kv.pool._cached[blk.block_hash]
        blk.block_hash = None
    b = _req("b", 41)
    hit = kv.find_cached_prefix(b)
    assert len(hit) == 10 and hit[:8] == [None] * 8 and all(x is not None for x in hit[8:])
    full = KVCacheManager(64, bs, "m", sliding_window=None)
    assert full.find_cached_prefix(_req("c", 41)) == []  # no window: contiguous from block 0 only
    # a prefill-only request keeps every block for export, so it needs the whole prefix
    assert kv.find_cached_prefix(_req("d", 41, prefill_only=True)) == []


def test_prefill_only_keeps_every_block_and_import_adopts_the_window() -> None:
    bs, win = 4, 6
    kv = KVCacheManager(32, bs, "m", sliding_window=win)
    p = _req("p", 30, prefill_only=True)
    for _ in range(6):
        _step(kv, p, 5)
    assert NULL_BLOCK not in kv.block_table("p") and kv.num_held_blocks("p") == 8
    d = _req("d", 30)
    ids = kv.adopt_blocks(d, 30)
    skip = kv.num_skippable_blocks(30)
    assert skip == (30 - win + 1) // bs == 6
    assert kv.block_table("d") == [NULL_BLOCK] * skip + ids and len(ids) == 2


# ------------------------------------------------------------------ engine vs transformers


def _engine(path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=256, max_num_batched_tokens=512)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


@pytest.mark.parametrize("arch", ["mistral_swa", "qwen2_swa"])
def test_chunked_prefill_and_prefix_hits_match_hf(tiny_models, hf, arch) -> None:
    """Chunks of 16 (< the window), block size 8; the second round's prompts share 64- and
    96-token prefixes with the first round's, so they start from prefix-cache hits."""
    path = tiny_models[arch]
    model = hf(arch)
    eng = _engine(path, block_size=8, long_prefill_token_threshold=16, max_num_batched_tokens=40)
    first = _prompts((100, 130), seed=5)
    second = [first[0][:64] + _prompts((40,), seed=6)[0], first[1][:96] + _prompts((7,), seed=7)[0]]
    outs = eng.generate(first, GREEDY)
    for ids, out in zip(first, outs, strict=True):
        _check(out, _hf_ref(model, ids, GREEDY.max_tokens))
    outs = eng.generate(second, GREEDY)
    assert [o.num_cached_tokens for o in outs] == [64, 96]
    for ids, out in zip(second, outs, strict=True):
        _check(out, _hf_ref(model, ids, GREEDY.max_tokens))
    assert eng.kv.num_used_blocks == 0


def test_the_window_changes_the_output(tiny_models, hf) -> None:
    """The golden tests have power: without its window the tiny Mistral answers differently."""
    from transformers import AutoModelForCausalLM

    no_window = AutoModelForCausalLM.from_pretrained(
        tiny_models["mistral_swa"], dtype=torch.float32, sliding_window=None
    ).eval()
    ids = _prompts((120,), seed=9)[0]
    with torch.no_grad():
        a = hf("mistral_swa")(torch.tensor([ids])).logits[0, -1]
        b = no_window(torch.tensor([ids])).logits[0, -1]
    assert (torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().max() > 10 * TOL


@pytest.mark.parametrize("arch", ["mistral_swa", "qwen2_swa"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_kv_handoff_under_a_window_equals_whole(tiny_models, arch, block_size) -> None:
    """prefill_only + export_kv on one engine, import_kv on another, decode: the whole engine's
    tokens and logprobs. The decode side holds only in-window blocks (Mistral) and frees the
    rest as it decodes."""
    path = tiny_models[arch]
    prompts = _prompts((23, 24, 25, 90), seed=11)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=0)
    whole = _engine(path, block_size=block_size).generate(prompts, params)
    pre = _engine(path, block_size=block_size, long_prefill_token_threshold=32)
    dec = _engine(path, block_size=block_size)
    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, params, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    windowed = dec.kv.sliding_window is not None
    for i, p in enumerate(prompts):
        kv = pre.export_kv(f"r{i}")
        assert kv.blocks.shape[0] == -(-len(p) // block_size)  # the whole prompt's KV travels
        dec.import_kv(
            f"r{i}",
            p,
            kv.first_token,
            kv.blocks,
            params,
            shape=kv.shape,
            model_id=kv.model_id,
            first_logprob=kv.first_logprob,
        )
        pre.release(f"r{i}")
        if windowed:
            assert dec.kv.num_held_blocks(f"r{i}") <= W // block_size + 2
    assert pre.kv.num_used_blocks == 0
    got: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    toks: dict[str, list[int]] = {}
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.logprobs)
            if o.finished:
                toks[o.request_id] = o.token_ids
        if windowed:
            for rid in dec.scheduler.requests:
                assert dec.kv.num_held_blocks(rid) <= W // block_size + 2
    for i, w in enumerate(whole):
        assert toks[f"r{i}"] == w.token_ids
        ours = torch.tensor([lp.logprob for lp in got[f"r{i}"]])  # tokens 2.. (1 came with the KV)
        ref = torch.tensor([lp.logprob for lp in w.logprobs][1:])
        assert torch.allclose(ours, ref, atol=1e-5)
    assert dec.kv.num_used_blocks == 0


def test_a_long_windowed_sequence_holds_bounded_blocks_and_leaks_none(tiny_models, hf) -> None:
    bs = 8
    eng = _engine(tiny_models["mistral_swa"], block_size=bs, num_kv_blocks=64)
    assert eng.kv.sliding_window == W
    ids = _prompts((40,), seed=13)[0]
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, logprobs=0)
    eng.add_request("long", ids, params)
    held = []
    final = None
    lps = []
    while eng.has_unfinished():
        for o in eng.step():
            lps.extend(o.logprobs)
            if o.finished:
                final = o
                final.logprobs = lps
        if eng.kv.has("long"):
            held.append(eng.kv.num_held_blocks("long"))
    # 240 tokens = 30 blocks without the window; with it, the window's blocks plus the one being
    # written plus one straddling the window's start (the 40-token prompt's 5 blocks at first)
    assert len(held) == 199  # every step but the last (which finished and freed it)
    assert max(held) <= W // bs + 2 and max(held[1:]) <= W // bs + 1
    assert eng.kv.num_used_blocks == 0 and eng.kv.num_free_blocks == eng.kv.num_blocks
    _check(final, _hf_ref(hf("mistral_swa"), ids, 200))


def test_mixed_layers_keep_every_block(tiny_models) -> None:
    """Qwen2 with a full-attention layer: nothing may be freed (that layer reads every block)."""
    eng = _engine(tiny_models["qwen2_swa"], block_size=8)
    assert eng.model_config.layer_windows == (None, W) and eng.kv.sliding_window is None
    eng.add_request("x", _prompts((60,))[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
        if eng.kv.has("x"):
            assert NULL_BLOCK not in eng.kv.block_table("x")
    assert eng.kv.num_used_blocks == 0


def test_tensor_parallel_windowed_engine_matches_tp1(tiny_models) -> None:
    """TP=2 (a spawned follower mirrors each step, window masks included) == TP=1, with
    out-of-window blocks freed on rank 0's manager."""
    path = tiny_models["mistral_swa"]
    prompts = _prompts((30, 77), seed=17)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    ref = _engine(path, block_size=8).generate(prompts, params)
    two = _engine(path, block_size=8, tensor_parallel_size=2)
    try:
        assert two.kv.sliding_window == W
        got = two.generate(prompts, params)
    finally:
        two.close()
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids
        for lr, lg in zip(r.logprobs, g.logprobs, strict=True):
            assert lg.logprob == pytest.approx(lr.logprob, abs=1e-4)
