"""Per-token cost of incremental detokenizing, four ways in the same run.

* ``old``: the detokenizer engine.detokenizer replaced (decodes the request's whole output for every
  new token, quadratic in the output length);
* ``window``: engine.detokenizer's Python window scheme (one or two decodes of a few recent ids per
  token), pdserve's path for every decoder but a lone ByteLevel;
* ``new``: engine.detokenizer as it runs for this tokenizer: on a lone ByteLevel decoder (SmolLM2)
  tokenizers' Rust ``DecodeStream`` plus the deltas, stop-string and resume bookkeeping
  (``Tokenizer.decode_stream``); otherwise the window (and the two columns are the same path);
* ``bound``: ``DecodeStream.step`` alone, one call per id (what vLLM v1's fast incremental
  detokenizer calls per token): the floor under any incremental detokenizer (only with a stream).

Each run streams one request's output ids (SmolLM2's tokenizer; the ids of a mixed English / code
/ multi-byte / emoji text, so characters split across tokens) one token at a time, then the final
add; the detokenizers alternate run by run (the order rotates each repeat, ``--repeats`` each) and
the median CPU microseconds per token (this thread's CPU time: on the shared host a run's wall
clock is mostly its waits for a CPU) and the ratios old/new, window/new and new/bound of the
medians are printed per output length, with the load average before and after. Every run's
streamed text is checked against decoding all the ids at once (the bound's, which flushes nothing
at the end, as a prefix of it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from pdserve.cli_help import apply  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. Héllo wörld — naïve café ✓ 日本語のテキスト 🙂👍🏽.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)  # Привет, мир! ∑∫√ 1, 2, 3, 4, 5\n"
    "Once upon a time, in a land far away, there lived a dragon who loved tea 🍵 and poetry 📜.\n"
)


@dataclass
class QuadraticDetokenizer:
    """The detokenizer this replaces (engine/tokenizer.py before), verbatim: decodes every id of
    the output for every new token."""

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    text: str = ""
    emitted: int = 0
    ids: list[int] = field(default_factory=list)

    def add(self, token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        self.ids.extend(token_ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd") and not final:
            full = full[:-1]
        matched: str | None = None
        if self.stop:
            start = max(0, len(self.text) - max(len(s) for s in self.stop))
            best = -1
            for s in self.stop:
                i = full.find(s, start)
                if i != -1 and (best == -1 or i < best):
                    best, matched = i, s
            if matched is not None:
                full = full[:best]
        self.text = full
        hold = 0 if (final or matched) else max((len(s) - 1 for s in self.stop), default=0)
        upto = max(self.emitted, len(full) - hold)
        delta = full[self.emitted : upto]
        self.emitted = upto
        return delta, matched


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="32,256,2048", help="output lengths in tokens, comma-separated")
    p.add_argument("--repeats", type=int, default=7, help="runs of each detokenizer per length")
    p.add_argument("--stop", default="\n\nUser:", help="a stop string that never matches (empty: none)")
    p.add_argument(
        "--model", default=None, help="tokenizer folder (default: the SmolLM2 model pdserve sets up)"
    )
    return apply(p)


class _WindowOnly(Tokenizer):
    """The tokenizer without its Rust decode stream: engine.detokenizer's Python window."""

    def decode_stream(self, skip_special_tokens: bool = True) -> None:
        return None


class _Bound:
    """``DecodeStream.step`` alone per id (no final flush, no stop strings): the floor."""

    def __init__(self, tok: Tokenizer) -> None:
        step = tok.decode_stream()
        assert step is not None, "the bound needs a tokenizer with a decode stream"
        self._step = step

    def add(self, token_ids: list[int], final: bool = False) -> tuple[str, None]:
        return "".join(c for c in map(self._step, token_ids) if c is not None), None


def _run(make, ids: list[int]) -> tuple[float, str]:
    d = make()
    t0 = time.thread_time()
    parts = [d.add([t])[0] for t in ids]
    parts.append(d.add([], final=True)[0])
    return time.thread_time() - t0, "".join(parts)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.model:
        path = Path(a.model)
    else:
        from pdserve.model_setup import ensure_default_model

        path = ensure_default_model(progress=False)
    tok = Tokenizer(path)
    window_tok = _WindowOnly(path)
    stop = (a.stop,) if a.stop else ()
    lengths = [int(x) for x in a.lengths.split(",")]
    base = tok.encode(TEXT, add_special_tokens=False)
    modes = {
        "old": lambda: QuadraticDetokenizer(tok, stop),
        "window": lambda: IncrementalDetokenizer(window_tok, stop),
        "new": lambda: IncrementalDetokenizer(tok, stop),
    }
    if tok.decode_stream() is not None:
        modes["bound"] = lambda: _Bound(tok)
    else:
        print(f"the tokenizer of {path} has no decode stream: new is the window, no bound")
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    cols = "".join(f"{m + ' us/tok':>15}" for m in modes)
    print(f"{'tokens':>7}{cols} {'old/new':>8} {'window/new':>11} {'new/bound':>10}  text identical")
    ok = True
    for n in lengths:
        ids = (base * (n // len(base) + 1))[:n]
        want = tok.decode(ids)
        us: dict[str, list[float]] = {m: [] for m in modes}
        same = True
        names = list(modes)
        for r in range(a.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                dt, text = _run(modes[name], ids)
                us[name].append(dt / n * 1e6)
                same &= want.startswith(text) if name == "bound" else text == want
        ok &= same
        med = {m: statistics.median(v) for m, v in us.items()}
        bound = f"{med['new'] / med['bound']:>10.2f}" if "bound" in med else f"{'-':>10}"
        print(
            f"{n:>7}{''.join(f'{med[m]:>15.2f}' for m in modes)} {med['old'] / med['new']:>8.2f}"
            f" {med['window'] / med['new']:>11.2f} {bound}  {'PASS' if same else 'FAIL'}"
        )
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
