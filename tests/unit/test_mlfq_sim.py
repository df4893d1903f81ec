"""The engine's MLFQ scheduler inside the simulator's step loop (simulator/instance.py runs the
engine Scheduler as-is, on the simulated clock and with the latency model's prefill time for
skip-join): short jobs overtake a long one."""

from __future__ import annotations

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig, SchedulingPolicy
from router.policy import InstanceRole
from simulator.events import EventLoop
from simulator.instance import SimInstance
from tests.sim_fakes import LinearLatency

CFG = SchedulerConfig(
    max_num_batched_tokens=512,
    max_num_seqs=1,
    long_prefill_token_threshold=0,
    max_model_len=2048,
    policy=SchedulingPolicy.MLFQ,
    mlfq_base_prefill_s=0.02,
    mlfq_quantum_iters=2,
)


def _instance(loop: EventLoop, done: dict[str, float]) -> SimInstance:
    def on_step(rep) -> None:
        for r in rep.done:
            done[r.request_id] = rep.end

    return SimInstance("mixed0", InstanceRole.MIXED, CFG, 256, 16, LinearLatency(1024), loop, on_step)


def test_mlfq_runs_in_the_simulator_step_loop_with_its_clock():
    loop = EventLoop()
    done: dict[str, float] = {}
    inst = _instance(loop, done)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    inst.submit(Request("long", range(400), sp, arrival_time=0.0))  # 0.4 s -> level 3
    for i in range(3):
        t = 0.5 + 0.05 * i
        loop.at(t, inst.submit, Request(f"short{i}", range(10), SamplingParams(max_tokens=3), arrival_time=t))
    loop.run()
    assert set(done) == {"long", "short0", "short1", "short2"}
    # the short jobs arrived while the long one decoded: they preempt it and finish first
    assert max(done[f"short{i}"] for i in range(3)) < done["long"]
    assert inst.sched.num_preemptions >= 1
    assert inst.kv.num_free_blocks == 256
