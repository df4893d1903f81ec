"""The pure edges of parallel sampling through the cluster: proto conversion of n/best_of, the
router's refusals and placement accounting (router/groups.py), the decode worker's per-choice
messages (decode_worker/groups.py), the prefill worker's prefix (prefill_worker/groups.py) and
the SDK's per-choice resume and grouping (pdserve/choices.py)."""

from __future__ import annotations

import pytest

from decode_worker.groups import check_group_handoff, group_messages
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from pdserve.choices import ChoicesResume, group_completions
from pdserve.client import Chunk, Finish
from pdserve.errors import InternalError, InvalidRequestError
from pdserve.proto_convert import sampling_from_proto, sampling_to_proto
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from prefill_worker.groups import group_prefix
from router.groups import check_group_request, placement_args


def test_n_and_best_of_round_trip_through_the_proto():
    p = SamplingParams(n=3, best_of=5, temperature=0.7, seed=2)
    m = sampling_to_proto(p)
    assert m.n == 3 and m.HasField("best_of") and m.best_of == 5
    assert sampling_from_proto(m) == p
    one = sampling_from_proto(common_pb2.SamplingParams())  # n unset (0): one choice
    assert one.n == 1 and one.best_of is None
    with pytest.raises(InvalidRequestError, match="best_of must be"):
        sampling_from_proto(common_pb2.SamplingParams(n=4, best_of=2))


def test_router_refuses_what_the_engine_cannot_run_naming_it():
    p = SamplingParams(n=2)
    check_group_request(p, client_pb2.GenerateRequest(), None)  # fine
    check_group_request(SamplingParams(), client_pb2.GenerateRequest(adapter="x"), 4096)  # n=1: untouched
    with pytest.raises(InvalidRequestError, match="adapter 'lora-a'"):
        check_group_request(p, client_pb2.GenerateRequest(adapter="lora-a"), None)
    with pytest.raises(InvalidRequestError, match="sliding-window"):
        check_group_request(p, client_pb2.GenerateRequest(), 4096)


def test_placement_sees_a_group_as_its_candidates():
    req = client_pb2.GenerateRequest(predicted_output_tokens=10)
    p, r = placement_args(SamplingParams(n=2, best_of=3, max_tokens=20), req)
    assert (p.max_tokens, p.n, p.best_of, r.predicted_output_tokens) == (60, 1, None, 30)
    assert req.predicted_output_tokens == 10  # the client's request is not changed
    single = SamplingParams(max_tokens=20)
    assert placement_args(single, req) == (single, req)


def test_prefill_prefix_is_all_but_the_last_token_greedy_one_step():
    ids, p = group_prefix([5, 6, 7], SamplingParams(n=2))
    assert ids == [5, 6] and p.greedy and p.max_tokens == 1 and p.n == 1
    with pytest.raises(InvalidRequestError, match="1-token prompt"):
        group_prefix([5], SamplingParams(n=2))
    with pytest.raises(InvalidRequestError, match="LoRA"):
        group_prefix([5, 6], SamplingParams(n=2), adapter="a")


def _out(ci: int, toks: list[int], finished: bool = False, text: str = "") -> RequestOutput:
    return RequestOutput(
        request_id="r",
        new_token_ids=toks,
        token_ids=toks,
        text_delta=text,
        text=text,
        finished=finished,
        finish_reason=FinishReason.LENGTH if finished else None,
        num_prompt_tokens=3,
        num_cached_tokens=0,
        logprobs=[TokenLogprob(t, -0.5) for t in toks],
        choice_index=ci,
    )


def test_decode_messages_hold_one_choice_each():
    err = RuntimeError("boom")
    msgs, failure = group_messages(
        "r", [_out(1, [4], text="a"), _out(0, [7]), _out(1, [5], True, "b"), err], with_text=True
    )
    assert failure is err
    assert [(m.choice_index, list(m.token_ids), m.text) for m in msgs] == [(1, [4, 5], "ab"), (0, [7], "")]
    assert msgs[0].finish.reason == common_pb2.FINISH_REASON_LENGTH and not msgs[1].HasField("finish")
    assert [lp.token_id for lp in msgs[0].logprobs] == [4, 5]


def test_group_handoff_fields_are_checked():
    p = SamplingParams(n=2)
    ok = worker_pb2.DecodeRequest(prompt_tail_pending=True)
    check_group_handoff(ok, p)
    for bad, match in [
        (worker_pb2.DecodeRequest(prompt_tail_pending=True, first_token=3), "first_token"),
        (worker_pb2.DecodeRequest(prompt_tail_pending=True, resume_token_ids=[1]), "resume"),
        (worker_pb2.DecodeRequest(prompt_tail_pending=True, adapter="a"), "LoRA"),
        (worker_pb2.DecodeRequest(), "prompt_tail_pending"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):
            check_group_handoff(bad, p)
    with pytest.raises(InvalidRequestError, match="parallel-sampling"):
        check_group_handoff(ok, SamplingParams())


def _fin(n: int) -> Finish:
    return Finish("length", "", 3, n, 0, 0.1, 0.2, [], {})


def test_sdk_resumes_each_choice_on_its_own_and_groups_them():
    r = ChoicesResume(2)
    assert r.trim(Chunk("id", [1, 2], "ab", choice_index=0)) is not None
    assert r.trim(Chunk("id", [9], "z", choice_index=1)) is not None
    assert r.delivered and not r.finished and r.tokens == 3
    r.restart()  # a new router replays the stream, interleaved differently
    again = r.trim(Chunk("other", [9, 8], "zy", choice_index=1))
    assert again is not None and again.token_ids == [8] and again.text == "y" and again.request_id == "id"
    assert r.trim(Chunk("other", [1, 2], "ab", choice_index=0)) is None
    with pytest.raises(InvalidRequestError, match="choice 2"):
        r.trim(Chunk("id", [1], "a", choice_index=2))
    chunks = [
        Chunk("id", [1], "a", choice_index=1),
        Chunk("id", [2], "b", choice_index=0, finish=_fin(1)),
        Chunk("id", [3], "c", choice_index=1, finish=_fin(2)),
    ]
    done = group_completions(chunks, 2)
    assert [(c.token_ids, c.text, c.finish.completion_tokens) for c in done] == [
        ([2], "b", 1),
        ([1, 3], "ac", 2),
    ]
    with pytest.raises(RuntimeError, match=r"choices \[1\]"):
        group_completions(chunks[:2], 2)


def test_openai_responses_carry_every_choice_and_sum_usage():
    from pdserve.openai_api.translate import ApiKind, ResponseMeta, StreamTranslator, build_response

    meta = ResponseMeta(ApiKind.CHAT, "chatcmpl-x", 1, "m", include_usage=True, n=2)
    chunks = [
        Chunk("id", [1], "Hi", choice_index=1),
        Chunk("id", [2], "Yo", choice_index=0, finish=_fin(1)),
        Chunk("id", [3], "!", choice_index=1, finish=_fin(2)),
    ]
    r = build_response(meta, chunks)
    assert [(c["index"], c["message"]["content"]) for c in r["choices"]] == [(0, "Yo"), (1, "Hi!")]
    assert r["usage"]["completion_tokens"] == 3 and r["usage"]["total_tokens"] == 6
    tr = StreamTranslator(meta)
    events = tr.start()
    assert [e["choices"][0]["index"] for e in events] == [0, 1]
    for c in chunks:
        assert not tr.finished
        events += tr.chunk(c)
    assert tr.finished
    events += tr.end()
    assert events[-1]["usage"]["completion_tokens"] == 3
    fins = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
    assert fins == [(0, "length"), (1, "length")]
    with pytest.raises(InternalError, match=r"choices \[1\]"):
        build_response(meta, chunks[:2])


def test_sdk_reads_n_from_params_or_keywords_only():
    from pdserve.choices import requested_n

    assert requested_n(None, {"max_tokens": 5, "timeout": 1.0, "metadata": ()}) == 1
    assert requested_n(None, {"n": 3, "timeout": 1.0}) == 3
    assert requested_n(SamplingParams(n=2), {"timeout": 1.0}) == 2
