"""Incremental detokenizing cost per token: pdserve's detokenizer against tokenizers' own stream.

Every streamed token is turned into text once on the serving path (the decode worker's event loop
for direct streams, the router's for relayed ones, ``engine.detokenizer``), under the GIL, beside
the engine (#12: ``bench/engine_contention.py``). Measured here on the real SmolLM2 tokenizer
(byte-level BPE), on ``--requests`` outputs of ``--tokens`` ids each cut from English and
multilingual text, token by token as a stream delivers them, final flush included:

* ``bound``: tokenizers' Rust ``DecodeStream.step`` alone, one call per id (what vLLM v1's fast
  incremental detokenizer calls per token): the floor;
* ``stream``: :class:`engine.detokenizer.IncrementalDetokenizer` on a tokenizer with a
  ``decode_stream`` (pdserve's path for a lone ByteLevel decoder: the Rust stream plus the
  deltas, stop-string and resume bookkeeping);
* ``window``: the same class without the stream (the Python window scheme: one or two decodes of
  a few ids per token; pdserve's path for every other decoder, and for byte-level ones before).

Each mode's text is checked against one decode of all ids. Printed: microseconds per token of each
(median over ``--repeats`` alternated runs), ``stream / bound`` (pdserve's overhead over the
floor) and ``window / stream`` (what the stream saves).

(``bench/detokenize.py`` compares the window scheme with the whole-output decode it replaced.)

Run: ``python bench/detokenize_stream.py`` (a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers.decoders import DecodeStream  # noqa: E402

from engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from pdserve.cli_help import apply  # noqa: E402
from pdserve.model_setup import ensure_default_model  # noqa: E402

MULTILINGUAL = "Héllo wörld — naïve café ✓ 日本語 🙂👍🏽 👨‍👩‍👧 ∑∫ Привет 𝔘𝔫𝔦 \n\t end. "


class _WindowOnly(Tokenizer):
    """The tokenizer without its Rust stream: the window scheme."""

    def decode_stream(self, skip_special_tokens: bool = True) -> None:
        return None


def _outputs(tok: Tokenizer, requests: int, tokens: int) -> list[list[int]]:
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + MULTILINGUAL * 200
    ids = tok.encode(text, add_special_tokens=False)
    need = requests * tokens
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * tokens : (i + 1) * tokens] for i in range(requests)]


def _bound(tok: Tokenizer, outs: list[list[int]]) -> list[str]:
    texts = []
    for ids in outs:
        s, parts = DecodeStream(skip_special_tokens=True), []
        for t in ids:
            c = s.step(tok._tok, t)
            if c is not None:
                parts.append(c)
        texts.append("".join(parts))
    return texts


def _pdserve(tok: Tokenizer) -> Callable[[Tokenizer, list[list[int]]], list[str]]:
    def run(_: Tokenizer, outs: list[list[int]]) -> list[str]:
        texts = []
        for ids in outs:
            d = IncrementalDetokenizer(tok)
            parts = [d.add([t])[0] for t in ids]
            parts.append(d.add([], final=True)[0])
            texts.append("".join(parts))
        return texts

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/detokenize_stream.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--requests", type=int, default=64, help="outputs detokenized per run")
    p.add_argument("--tokens", type=int, default=256, help="tokens per output")
    p.add_argument("--repeats", type=int, default=5, help="alternated runs per mode (median)")
    return apply(p)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("requests", "tokens", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(a, name)}")
    path = ensure_default_model(progress=False)
    tok, window = Tokenizer(path), _WindowOnly(path)
    if tok.decode_stream() is None:
        raise SystemExit(f"the tokenizer of {path} has no decode stream: nothing to compare")
    outs = _outputs(tok, a.requests, a.tokens)
    want = [tok.decode(ids) for ids in outs]
    modes: dict[str, Callable[[Tokenizer, list[list[int]]], list[str]]] = {
        "bound": _bound,
        "stream": _pdserve(tok),
        "window": _pdserve(window),
    }
    n = a.requests * a.tokens
    us: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(a.repeats):
        for m, run in modes.items():
            t0 = time.perf_counter()
            got = run(tok, outs)
            us[m].append(1e6 * (time.perf_counter() - t0) / n)
            if got != want:
                bad = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
                raise SystemExit(f"{m}: output {bad}'s text differs from one decode of its ids")
        print(f"repeat {r + 1}/{a.repeats} done", file=sys.stderr, flush=True)
    med = {m: statistics.median(v) for m, v in us.items()}
    print(f"SmolLM2 tokenizer, {a.requests} outputs x {a.tokens} tokens, {a.repeats} repeats (median)")
    for m in modes:
        print(f"  {m:7s} {med[m]:7.2f} us/token  (runs {', '.join(f'{x:.2f}' for x in us[m])})")
    print(
        f"  stream / bound  {med['stream'] / med['bound']:.2f}x  (pdserve's overhead over tokenizers' stream)"
    )
    print(f"  window / stream {med['window'] / med['stream']:.2f}x  (what the stream saves per token)")
    print("  every mode's text equals one decode of all ids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
