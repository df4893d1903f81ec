"""Speculative decoding on a launched decode worker (#17), disaggregated: client (SDK) -> router
-> prefill worker -> store -> decode worker started with ``--speculative-tokens``.

Greedy and seeded outputs through the router equal the engine run whole without speculation,
token for token, and the streamed text (direct streams from the decode worker, and relayed by the
router) is that engine's final text; first with prompt-lookup (n-gram) drafting, then with the
decode worker restarted with ``--speculative-draft-model`` (a tiny draft of the target's vocabulary
and tokenizer: the target's weights plus noise, so that it proposes tokens the target keeps and
tokens it rejects).

That the worker really speculated: its WorkerStats ``spec_accepted_tokens_total`` (drafted tokens
the target kept) over each run must equal the count of an engine in this process with the worker's
speculative configuration (n-gram K=4, n=3; then the draft model) running the same requests whole,
and be above 0: a worker that ignored its speculation flags, or drafted by prompt lookup when given
a draft model, fails. Its ``decode_tokens_total`` grows by exactly the tokens it decoded (every
token but the first, which the prefill worker samples), kept drafts included, as a plain engine's
does.

The stop cases: a stop token inside a run of kept drafts (the decode worker renders such a
request's text on its event loop, ``OutputText(speculative=True)``: of a step's several tokens only
the last may be the stop token; a run holding the stop token's id twice, the first before
``min_tokens``, shows the first), and a stop string completed inside a run.

One cluster for the module (tiny random Llama with SmolLM2's tokenizer; store, router, 1 prefill +
1 decode; the goodput policy without local prefill, so every request is prefilled on the prefill
worker and decoded on the decode worker); the draft-model test, last, restarts its decode worker."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.spec_decode import SpecMethod, SpeculativeConfig
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.clusters import random_prompt

K = 4  # drafts per step
NGRAM = 3
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
# prompts of token ids (the tiny model's vocabulary is SmolLM2's first 320 ids): two with a
# repeated pattern (the n-gram lookup finds the continuation in the prompt), two random ones
PROMPTS: list[list[int]] = [
    [17, 42, 99, 130, 7, 250] * 5,
    [60, 61, 62, 63, 64, 65, 66, 67] * 3 + [60, 61],
    random_prompt(300, 1),
    random_prompt(300, 2),
]


def _seeded(i: int) -> SamplingParams:
    # the tiny random model's next-token distributions are flat: top_k keeps the draws repeating
    # often enough that prompt lookup proposes tokens the seeded draws keep
    return SamplingParams(max_tokens=24, temperature=0.8, top_k=3, top_p=0.95, seed=40 + i, ignore_eos=True)


SEEDED = [_seeded(i) for i in range(len(PROMPTS))]
MIXED = [GREEDY, _seeded(7), GREEDY, _seeded(8)]


@pytest.fixture(scope="module")
def models(smollm_path, tmp_path_factory) -> dict[str, Path]:
    """The tiny random Llama ("target") and its draft ("draft"): the same weights plus noise
    (N(0, 0.02) on every matrix, against the target's N(0, 0.08)); both with SmolLM2's tokenizer."""
    from tests.tiny_models import _configs, random_model

    root = tmp_path_factory.mktemp("spec")
    cfg = _configs()["llama"]
    out = {}
    for name in ("target", "draft"):
        model = random_model(cfg, 1234)
        if name == "draft":
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm_path / f, root / name / f)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def cluster(models):
    cl = launch(
        ClusterSpec(
            model_path=str(models["target"]),
            worker_kv_blocks=256,
            store_capacity_blocks=512,
            # the prefill worker gets them too (the launcher has one set of worker flags): it only
            # computes prompts, which speculation does not change
            worker_args=("--speculative-tokens", str(K), "--speculative-ngram", str(NGRAM)),
            router_args=("--local-prefill-max-tokens", "0"),
        )
    )
    yield cl
    cl.stop()


def _engine(path: Path, spec: SpeculativeConfig | None) -> LLMEngine:
    return LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=256, speculative=spec))


NGRAM_SPEC = SpeculativeConfig(num_speculative_tokens=K, ngram_max=NGRAM)


def _draft_spec(models) -> SpeculativeConfig:
    return SpeculativeConfig(
        method=SpecMethod.DRAFT_MODEL, draft_model=str(models["draft"]), num_speculative_tokens=K
    )


@pytest.fixture(scope="module")
def plain(models) -> LLMEngine:
    """The engine whole, without speculation: the outputs every run must equal."""
    return _engine(models["target"], None)


def _stats(cl: LocalCluster, worker: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(cl.workers[worker]) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=30)


def _whole(
    eng: LLMEngine, params: list[SamplingParams], *, together: bool = True
) -> tuple[list[RequestOutput], int]:
    """PROMPTS run whole on ``eng`` (``together``: in one batch, else one after another); their
    outputs and the drafted tokens the engine kept (``spec_accepted_tokens``) over the run; the
    engine's ``decode_tokens`` must grow by exactly the tokens its decode steps emitted."""
    before, dec_before = eng.stats().spec_accepted_tokens, eng.stats().decode_tokens
    if together:
        out = eng.generate(PROMPTS, params)
    else:
        out = [eng.generate([p], [sp])[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert eng.stats().decode_tokens - dec_before == sum(len(o.token_ids) - 1 for o in out)
    return out, eng.stats().spec_accepted_tokens - before


def assert_same_outputs(tok, want: list[RequestOutput], got: list, params: list[SamplingParams]) -> None:
    """The client's completions ``got`` of PROMPTS (``Client.complete``) equal the engine's
    outputs ``want``: tokens, the streamed text joined == the engine's final text == its tokens
    decoded by ``tok``, and a length finish after each request's ``max_tokens``."""
    for p, w, g, sp in zip(PROMPTS, want, got, params, strict=True):
        assert g.token_ids == w.token_ids, (p, sp)
        assert g.text == w.text == tok.decode(w.token_ids), (p, sp)
        assert g.finish.reason == "length" and g.finish.completion_tokens == sp.max_tokens


def _check(
    cl: LocalCluster,
    plain: LLMEngine,
    spec: LLMEngine,
    params: list[SamplingParams],
    *,
    direct: bool,
    together: bool = True,
) -> tuple[int, int]:
    """PROMPTS through the router (``together``: concurrently, else one after another;
    ``direct``: streamed by the decode worker, else relayed by the router) == the whole engine
    without speculation: tokens, finish, and the streamed text joined (``Client.complete``) ==
    that engine's final text == its tokens decoded. Disaggregated: every prompt computed on the
    prefill worker, none on the decode worker. The decode worker kept exactly the drafts ``spec``
    (an engine with the worker's speculative configuration) keeps for them whole, run the same
    way, at least one, and counted every token it decoded. Returns (tokens the decode worker
    decoded, drafts it kept)."""
    ref, plain_accepted = _whole(plain, params)
    decoded = sum(len(r.token_ids) - 1 for r in ref)  # the first token is the prefill worker's
    assert plain_accepted == 0
    spec_out, spec_accepted = _whole(spec, params, together=together)
    assert [o.token_ids for o in spec_out] == [r.token_ids for r in ref]
    dec, pre = _stats(cl, "decode-0"), _stats(cl, "prefill-0")
    with (
        Client(cl.router_address, timeout=120, direct=direct) as c,
        cf.ThreadPoolExecutor(len(PROMPTS)) as ex,
    ):
        args = zip(PROMPTS, params, strict=True)
        got = list(ex.map(lambda a: c.complete(*a), args) if together else (c.complete(*a) for a in args))
    dec2, pre2 = _stats(cl, "decode-0"), _stats(cl, "prefill-0")
    assert pre2.prefill_tokens_computed_total - pre.prefill_tokens_computed_total >= len(PROMPTS)
    assert dec2.prefill_tokens_computed_total == dec.prefill_tokens_computed_total
    assert_same_outputs(plain.tokenizer, ref, got, params)
    assert dec2.decode_tokens_total - dec.decode_tokens_total == decoded
    accepted = dec2.spec_accepted_tokens_total - dec.spec_accepted_tokens_total
    assert accepted == spec_accepted, (
        f"decode worker kept {accepted} drafts, the speculative engine {spec_accepted}"
    )
    assert accepted > 0, f"no accepted draft for {decoded} tokens"
    assert dec2.spec_draft_tokens_total - dec.spec_draft_tokens_total >= accepted
    return decoded, accepted


@pytest.fixture(scope="module")
def ngram(models) -> LLMEngine:
    return _engine(models["target"], NGRAM_SPEC)


def test_ngram_greedy_equals_the_whole_engine_and_drafts_are_accepted(cluster, plain, ngram) -> None:
    decoded, accepted = _check(cluster, plain, ngram, [GREEDY] * len(PROMPTS), direct=True)
    # several kept drafts per prompt
    assert accepted >= 2 * len(PROMPTS), (decoded, accepted)


def test_ngram_seeded_sampling_equals_the_whole_engine(cluster, plain, ngram) -> None:
    _check(cluster, plain, ngram, SEEDED, direct=True)


def test_ngram_relayed_stream_text_equals_the_final_text(cluster, plain, ngram) -> None:
    """Streams relayed by the router (no direct stream): the same tokens and text."""
    _check(cluster, plain, ngram, MIXED, direct=False)


def _steps(eng: LLMEngine, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    """The tokens each engine step emitted for ``prompt`` run alone on ``eng`` (the first: the
    prefill's)."""
    eng.add_request("steps", prompt, params)
    out: list[list[int]] = []
    while eng.has_unfinished():
        out += [list(o.new_token_ids) for o in eng.step() if o.request_id == "steps"]
    return out


def _whole_one(eng: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[RequestOutput, int]:
    before, dec_before = eng.stats().spec_accepted_tokens, eng.stats().decode_tokens
    (out,) = eng.generate([prompt], params)
    assert eng.stats().decode_tokens - dec_before == len(out.token_ids) - 1
    return out, eng.stats().spec_accepted_tokens - before


def _stop_runs(
    cl: LocalCluster, plain: LLMEngine, spec: LLMEngine, prompt: list[int], params: SamplingParams
) -> None:
    """``prompt`` with ``params`` through the cluster, streamed directly and relayed: the whole
    plain engine's tokens, text and finish (a stop), keeping the drafts ``spec`` keeps."""
    (ref,) = plain.generate([prompt], params)
    assert ref.finish_reason.value == "stop", ref
    _, spec_accepted = _whole_one(spec, prompt, params)
    assert spec_accepted > 0
    for direct in (True, False):
        before = _stats(cl, "decode-0")
        with Client(cl.router_address, timeout=120, direct=direct) as c:
            got = c.complete(prompt, params)
        assert got.token_ids == ref.token_ids and got.text == ref.text, (direct, params)
        assert got.finish.reason == "stop", got.finish
        after = _stats(cl, "decode-0")
        assert after.spec_accepted_tokens_total - before.spec_accepted_tokens_total == spec_accepted
        assert after.decode_tokens_total - before.decode_tokens_total == len(ref.token_ids) - 1


def test_ngram_stop_token_and_stop_string_inside_an_accepted_run(cluster, plain, ngram) -> None:
    """A request that stops inside a step's run of kept drafts is cut there, as plain decoding
    stops. A stop token id: the decode worker renders such a request's text itself (no stop
    string), from the step's several tokens, where only the last can be the stop token: a run
    holding the stop token's id twice, the first occurrence before ``min_tokens``, must show the
    first and not the last. A stop string: the engine cuts the run at the token completing it."""
    runs = [(i, _steps(ngram, p, GREEDY)) for i, p in enumerate(PROMPTS)]
    # a decode step keeping a token x twice, at output indices a < b
    found = None
    for i, steps in runs:
        n = len(steps[0])
        for st in steps[1:]:
            dup = [(a, b) for a in range(len(st)) for b in range(a + 1, len(st)) if st[a] == st[b]]
            if dup and found is None:
                a, b = dup[0]
                found = (i, st[b], n + b)
            n += len(st)
    assert found is not None, runs
    i, x, b = found
    _stop_runs(cluster, plain, ngram, PROMPTS[i], replace(GREEDY, stop_token_ids=(x,), min_tokens=b + 1))
    # a stop string completed by a token inside a run (not its last): the text that token adds
    tok = plain.tokenizer
    tried = []
    for i, steps in runs:
        out = [t for st in steps for t in st]
        n = len(steps[0])
        for st in steps[1:]:
            for j in range(n, n + len(st) - 1):
                before, upto = tok.decode(out[:j]), tok.decode(out[: j + 1])
                stop = next((upto[-m:] for m in range(1, len(upto) + 1) if upto[-m:] not in before), "")
                if not stop or "\ufffd" in stop:
                    continue
                params = replace(GREEDY, stop=(stop,))
                (ref,) = plain.generate([PROMPTS[i]], params)
                tried.append((i, j, stop))
                if ref.token_ids == out[: j + 1]:
                    _stop_runs(cluster, plain, ngram, PROMPTS[i], params)
                    return
            n += len(st)
    raise AssertionError(f"no stop string ends a run's token: {tried}")


def test_draft_model_greedy_and_seeded_equal_the_whole_engine(cluster, plain, ngram, models) -> None:
    """The decode worker restarted with --speculative-draft-model (the noisy copy of the target)
    instead of --speculative-ngram: greedy and seeded outputs still the whole engine's, in the
    decode steps an engine drafting with that model takes (not prompt lookup's)."""
    name = "decode-0"
    argv = cluster.argv[name]
    i = argv.index("--speculative-ngram")
    cluster.argv[name] = [*argv[:i], *argv[i + 2 :], "--speculative-draft-model", str(models["draft"])]
    cluster.kill(name)
    cluster.restart(name)
    draft = _engine(models["target"], _draft_spec(models))
    for params, direct in (([GREEDY] * len(PROMPTS), True), (SEEDED, False)):
        # one request at a time, on the worker as in the engine here: a draft model's proposals
        # (unlike prompt lookup's) could depend on the batch its forward passes ran in
        _, accepted = _check(cluster, plain, draft, params, direct=direct, together=False)
        assert accepted != _whole(ngram, params)[1]  # the worker drafted with the model, not by lookup
