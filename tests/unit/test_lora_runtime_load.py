"""An adapter registered at run time (the worker's WorkerAdmin.LoadAdapter calls
LoRAManager.register on a gRPC thread) does not stall running requests (#16: "loading an adapter
does not stall running requests"): while its read from disk is held up, requests of the base
model and of an adapter already served run to their end; the new adapter is refused until its
read completes, then served exactly (== an engine started with it)."""

from __future__ import annotations

import threading

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.errors import ModelNotFoundError
from tests.lora_adapters import make_adapter, make_tiny_llama

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runtime_load")
    base = make_tiny_llama(root)
    a1 = make_adapter(base, root / "a1", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=31)
    late = make_adapter(base, root / "late", r=2, alpha=4, targets=["o_proj", "down_proj"], seed=32)
    return base, a1, late


def _drain(eng: LLMEngine, max_steps: int = 200) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
    return out


def test_run_time_registration_does_not_stall_running_requests(tiny, monkeypatch) -> None:
    import engine.lora.manager as manager

    base, a1, late = tiny
    eng = LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=64), lora=LoRAConfig((AdapterSpec("a1", str(a1)),), max_lora_rank=4)
    )
    ref = LLMEngine.from_pretrained(
        base,
        EngineConfig(num_kv_blocks=64),
        lora=LoRAConfig((AdapterSpec("a1", str(a1)), AdapterSpec("late", str(late)))),
    )
    gate, reading = threading.Event(), threading.Event()
    try:
        real = manager.load_adapter

        def held_read(*args, **kw):
            reading.set()
            assert gate.wait(60), "the test never released the read"
            return real(*args, **kw)

        monkeypatch.setattr(manager, "load_adapter", held_read)
        errors: list[BaseException] = []

        def register() -> None:
            try:
                eng.lora.register(AdapterSpec("late", str(late)))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        loader = threading.Thread(target=register, name="admin-load", daemon=True)
        loader.start()
        assert reading.wait(30)
        # the read is under way: requests of the base model and of a served adapter run to their end
        prompt = list(range(5, 30))
        eng.add_request("base", prompt, GREEDY)
        eng.add_request("a1", prompt, GREEDY, adapter_id="a1")
        done: dict[str, list[int]] = {}
        stepper = threading.Thread(target=lambda: done.update(_drain(eng)), name="engine", daemon=True)
        stepper.start()
        stepper.join(60)
        assert not stepper.is_alive(), "the engine stalled while an adapter was being read"
        assert sorted(done) == ["a1", "base"] and loader.is_alive()
        # not served until its read completes (never answered by the base model meanwhile)
        with pytest.raises(ModelNotFoundError, match="'late' is not served"):
            eng.add_request("early", prompt, GREEDY, adapter_id="late")
        gate.set()
        loader.join(60)
        assert not loader.is_alive() and not errors, errors
        assert eng.adapters() == ["a1", "late"]
        eng.add_request("late", prompt, GREEDY, adapter_id="late")
        got = _drain(eng)["late"]
        monkeypatch.setattr(manager, "load_adapter", real)
        want = {}
        for rid, adapter in (("late", "late"), ("a1", "a1"), ("base", "")):
            ref.add_request(rid, prompt, GREEDY, adapter_id=adapter)
            want.update(_drain(ref))
        assert got == want["late"] and done["a1"] == want["a1"] and done["base"] == want["base"]
        assert want["late"] != want["base"]  # the late adapter really acts
    finally:
        gate.set()  # a stalled engine gets its lock back before closing
        eng.close()
        ref.close()
