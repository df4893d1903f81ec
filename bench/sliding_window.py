"""Sliding-window benchmark: KV blocks held and decode step time past the window.

A random-weight Mistral-like model (CPU-sized: 4 layers, hidden 256, 8 heads / 4 KV heads,
window 512 by default) is saved twice, with and without ``sliding_window``. Measured in this
run, printed as ratios:

1. KV blocks held by one sequence at 4x the window: windowed vs the same model without a
   window. Expected: the window's share, ``(window / block_size + 1) / (4 * window / block_size)``
   (the window's blocks plus the block straddling its start). Also the peak held during its
   chunked prefill.
2. Decode step time (engine ``step()``, a batch of sequences) at 4x the window vs at 1x, on the
   windowed model: out-of-window blocks are freed and never gathered, so the step should not
   grow with the context. Target: ratio <= 1 within the timing noise (PASS at <= 1.05).
   For reference the same ratio without a window (it grows with the context).

The two contexts are timed interleaved (one step each, alternately) so that machine noise hits
both alike; the medians are compared.

Usage: python bench/sliding_window.py [--window 512] [--block-size 16] [--batch 8] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

PASS_MARGIN = 1.05  # decode-time ratio accepted as "no slower" (timing noise on a shared CPU)


def make_model(root: Path, window: int | None, max_pos: int) -> Path:
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max_pos,
        sliding_window=window,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    d = root / ("swa" if window else "full")
    model.save_pretrained(d, safe_serialization=True)
    return d


def _engine(path: Path, block_size: int, blocks: int, batch: int) -> LLMEngine:
    return LLMEngine.from_pretrained(
        path,
        EngineConfig(
            block_size=block_size,
            num_kv_blocks=blocks,
            max_num_seqs=batch,
            max_num_batched_tokens=2048,
            long_prefill_token_threshold=512,
            enable_prefix_caching=False,
        ),
    )


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1024, (n,), generator=g).tolist()


def blocks_held(path: Path, window: int, block_size: int) -> tuple[int, int]:
    """Blocks one sequence holds once it reaches 4x the window, and its peak before."""
    total = 4 * window
    eng = _engine(path, block_size, total // block_size + 8, 1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng.add_request("s", _prompt(total - 8, 1), params)
    peak = held = 0
    while eng.has_unfinished():
        eng.step()
        if eng.kv.has("s"):
            held = eng.kv.num_held_blocks("s")
            peak = max(peak, held)
    assert eng.kv.num_used_blocks == 0, "blocks leaked"
    return held, peak


def decode_times(path: Path, window: int, block_size: int, batch: int, steps: int) -> tuple[float, float]:
    """Median decode step time of ``batch`` sequences at context ~1x and ~4x the window."""
    engines = {}
    for mult in (1, 4):
        ctx = mult * window
        eng = _engine(path, block_size, batch * (ctx + 2 * steps + 64) // block_size + 2 * batch, batch)
        # enough tokens that none finishes while timed (early prefills start decoding first)
        params = SamplingParams(max_tokens=2 * steps + 32, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            eng.add_request(f"r{i}", _prompt(ctx, 100 * mult + i), params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
            eng.step()  # prefill (chunked) until every sequence decodes
        eng.step()
        engines[mult] = eng
    times: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(steps):
        for mult in (1, 4):
            t = time.perf_counter()
            out = engines[mult].step()
            times[mult].append(time.perf_counter() - t)
            assert len(out) == batch
    return statistics.median(times[1]), statistics.median(times[4])


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=512, help="sliding window of the model, tokens")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded per step")
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed per context")
    return cli_help.apply(ap)


def main() -> None:
    ap = build_parser()
    a = ap.parse_args()
    w, bs = a.window, a.block_size
    with tempfile.TemporaryDirectory() as tmp:
        swa = make_model(Path(tmp), w, 4 * w + 2 * a.steps + 128)
        full = make_model(Path(tmp), None, 4 * w + 2 * a.steps + 128)
        print(f"model: Mistral-like, 4 layers, hidden 256, 8/4 heads, window {w}, block size {bs}, CPU")
        held_w, peak_w = blocks_held(swa, w, bs)
        held_f, _ = blocks_held(full, w, bs)
        expected = (w // bs + 1) / (4 * w // bs)
        print(
            f"[1] KV blocks held at 4x the window ({4 * w} tokens): windowed {held_w}, no window {held_f}; "
            f"ratio {held_w / held_f:.3f} (expected ~{expected:.3f} = (window/block + 1) / (4 window/block)); "
            f"peak during chunked prefill {peak_w}"
        )
        t1, t4 = decode_times(swa, w, bs, a.batch, a.steps)
        f1, f4 = decode_times(full, w, bs, a.batch, a.steps)
        r = t4 / t1
        verdict = "PASS" if r <= PASS_MARGIN else "FAIL"
        print(
            f"[2] decode step, batch {a.batch}, median of {a.steps}: windowed {t1 * 1e3:.2f} ms at 1x, "
            f"{t4 * 1e3:.2f} ms at 4x the window: ratio {r:.3f} (target <= 1, PASS at <= {PASS_MARGIN}) {verdict}"
        )
        print(
            f"    reference, no window: {f1 * 1e3:.2f} ms at {w} tokens, {f4 * 1e3:.2f} ms at {4 * w}: "
            f"ratio {f4 / f1:.3f}"
        )


if __name__ == "__main__":
    main()
