"""Bad input gets a clear, typed error, never a crash."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode, InvalidRequestError, ModelNotFoundError, RequestNotFoundError


@pytest.fixture(scope="module")
def eng(tiny_models):
    return LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=64))


def test_empty_prompt(eng):
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request(None, [], SamplingParams())
    assert InvalidRequestError("x").code is ErrorCode.INVALID_ARGUMENT


def test_prompt_longer_than_context(eng):
    with pytest.raises(InvalidRequestError, match="context is 512"):
        eng.add_request(None, [5] * 600, SamplingParams())


def test_token_ids_out_of_vocab(eng):
    with pytest.raises(InvalidRequestError, match="out of range"):
        eng.add_request(None, [5, 99999], SamplingParams())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_values(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path():
    from pdserve.model_setup import resolve_model_path

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path("/definitely/not/a/model")
    with pytest.raises(ModelNotFoundError):
        LLMEngine.from_pretrained("/definitely/not/a/model")


def test_folder_that_is_not_a_model(tmp_path):
    from pdserve.model_setup import resolve_model_path

    with pytest.raises(ModelNotFoundError, match="missing config.json"):
        resolve_model_path(tmp_path)


def test_duplicate_and_unknown_request_ids(eng):
    eng.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=2))
    eng.abort("dup")
    with pytest.raises(RequestNotFoundError):
        eng.abort("nope")


def test_cli_reports_error_not_traceback(capsys):
    from pdserve.cli import main

    assert main(["generate", "--embedded", "--model", "/no/such/model", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the router's Generate checks


@pytest.fixture(scope="module")
def router_svc(smollm_path):
    """The router's Generate servicer with no worker registered: a request that passes its checks
    is refused UNAVAILABLE at placement, so the checks' boundaries show."""
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import RouterMetrics
    from router.registry import Registry
    from router.service import GenerateServicer, RouterConfig

    cfg = RouterConfig(model_path=str(smollm_path), model_id="smol")
    return GenerateServicer(Registry(heartbeat_timeout_s=1e9), cfg, RouterMetrics(CollectorRegistry()))


def _generate(svc, **fields):
    """Run the router's (async) Generate on a fresh event loop; the responses it wrote."""
    import asyncio

    from pdserve.v1 import client_pb2, common_pb2

    sampling = common_pb2.SamplingParams(max_tokens=fields.pop("max_tokens", 4))
    req = client_pb2.GenerateRequest(sampling=sampling, **fields)
    out: list[client_pb2.GenerateResponse] = []

    class _Ctx:  # the part of grpc.aio.ServicerContext Generate uses
        def time_remaining(self) -> None:
            return None

        def invocation_metadata(self) -> tuple:
            return ()

        async def write(self, msg: client_pb2.GenerateResponse) -> None:
            out.append(msg)

    asyncio.run(svc.Generate(req, _Ctx()))
    return out


def test_router_refuses_prompt_plus_max_tokens_beyond_context(router_svc):
    from pdserve.errors import UnavailableError
    from pdserve.v1 import client_pb2

    ctx = router_svc.max_model_len
    ids = client_pb2.TokenIds(ids=[5] * 100)
    with pytest.raises(InvalidRequestError) as ei:
        _generate(router_svc, prompt_token_ids=ids, max_tokens=ctx - 99)
    assert ei.value.message.startswith(f"prompt has 100 tokens + max_tokens {ctx - 99} > context {ctx}")
    with pytest.raises(UnavailableError, match="no decode worker"):  # exactly fits: accepted
        _generate(router_svc, prompt_token_ids=ids, max_tokens=ctx - 100)


def test_router_refuses_unknown_model_and_any_adapter(router_svc):
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-17'") as ei:
        _generate(router_svc, prompt="hi", model="gpt-17")
    assert ei.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ModelNotFoundError, match="LoRA adapter 'my-lora' is not served"):
        _generate(router_svc, prompt="hi", model="smol", adapter="my-lora")
