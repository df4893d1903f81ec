"""Local profile: file format, least-squares fit and its held-out error, measuring with a fake engine."""

from __future__ import annotations

import pytest

from engine.block_manager import KVCacheManager
from engine.request import Request
from engine.scheduler import Scheduler, SchedulerConfig
from simulator import profile as prof
from simulator.latency import ProfiledLatencyModel
from simulator.profile import PointKind, Profile, ProfileGrid, ProfilePoint, fit, fit_error, holdout_error

TRUE_PREFILL = (2e-3, 1e-4, 2e-8)
TRUE_DECODE = (5e-3, 1e-6, 3e-4)


def _true(kind: PointKind, b: int, t: int, c: int) -> float:
    if kind is PointKind.PREFILL:
        a, bb, cc = TRUE_PREFILL
        return a + bb * b * t + cc * b * ((c + t) ** 2 - c * c)
    a, bb, cc = TRUE_DECODE
    return a + bb * b * c + cc * b


def _synthetic_profile(noise: float = 0.0) -> Profile:
    pts = []
    for i, (kind, b, t, c) in enumerate(ProfileGrid().points()):
        wobble = 1 + noise * ((i * 7919) % 13 - 6) / 6
        pts.append(ProfilePoint(kind, b, t, c, _true(kind, b, t, c) * wobble))
    return Profile("fake", "cpu", tuple(pts), kv_bytes_per_token=1024)


def test_fit_recovers_coefficients_and_holdout_error_is_reported() -> None:
    p = _synthetic_profile()
    f = fit(p)
    assert f.prefill == pytest.approx(TRUE_PREFILL, rel=1e-6)
    assert f.decode == pytest.approx(TRUE_DECODE, rel=1e-6)
    noisy = _synthetic_profile(noise=0.05)
    err = holdout_error(noisy)
    print(f"held-out relative error with +-5% noise: mean {err.mean:.3%} max {err.max:.3%} on {err.n} points")
    assert err.n > 5 and err.mean < 0.05 and err.max < 0.12
    assert fit_error(f, p.points).max < 1e-6


def test_fit_keeps_coefficients_non_negative() -> None:
    pts = [ProfilePoint(PointKind.DECODE, b, 1, 100, 0.01 - 1e-5 * b) for b in (1, 2, 4, 8)]
    f = fit(pts)
    assert min(f.decode) >= 0 and f.prefill == (0.0, 0.0, 0.0)


def test_save_load_round_trip(tmp_path) -> None:
    p = _synthetic_profile()
    path = tmp_path / "p.json"
    prof.save(p, path)
    assert prof.load(path) == p
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError):
        prof.load(path)


def test_profiled_latency_model() -> None:
    m = ProfiledLatencyModel(_synthetic_profile())
    assert m.prefill_time([128]) == pytest.approx(_true(PointKind.PREFILL, 1, 128, 0))
    assert m.decode_time(8, 8 * 300) == pytest.approx(_true(PointKind.DECODE, 8, 1, 300))
    assert m.kv_bytes_per_token == 1024


class FakeEngine:
    """The engine API over the real (pure) scheduler; each step advances a fake clock by a known cost."""

    def __init__(self, clock: list[float]) -> None:
        self.kv = KVCacheManager(4096, 16, "fake")
        self.scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), self.kv)
        self.clock = clock

    def add_request(self, request_id, prompt, params):
        self.scheduler.add_request(Request(request_id, list(prompt), params))
        return request_id

    def step(self):
        out = self.scheduler.schedule()
        pre = [(s.num_new_tokens, s.start) for s in out.scheduled if not s.request.is_decoding]
        dec = [s.start for s in out.scheduled if s.request.is_decoding]
        cost = 0.0
        if pre:
            cost += TRUE_PREFILL[0] + sum(
                TRUE_PREFILL[1] * n + TRUE_PREFILL[2] * ((c + n) ** 2 - c * c) for n, c in pre
            )
        if dec:
            cost += TRUE_DECODE[0] + TRUE_DECODE[1] * sum(dec) + TRUE_DECODE[2] * len(dec)
        self.clock[0] += cost
        self.scheduler.update_from_output(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        return []

    def has_unfinished(self):
        return self.scheduler.has_unfinished()

    def abort(self, request_id):
        self.scheduler.abort_request(request_id)


def test_measure_profile_with_a_fake_engine() -> None:
    clock = [0.0]
    grid = ProfileGrid(prefill_tokens=(32, 128), prefill_batches=(1, 2), prefill_contexts=(0, 64),
                       decode_batches=(1, 4), decode_contexts=(32, 128), repeats=1)  # fmt: skip
    p = prof.measure_profile(lambda: FakeEngine(clock), grid, progress=False, timer=lambda: clock[0])
    assert len(p.points) == 12
    f = fit(p)
    assert f.prefill == pytest.approx(TRUE_PREFILL, rel=1e-3)
    # decode context is reported at the middle of the timed steps: the fit recovers the truth closely
    assert fit_error(f, p.points).max < 0.02


@pytest.mark.parametrize(
    "content, says",
    [
        ("not json at all", "not JSON"),
        ("[1, 2]", "format='list'"),
        ('{"format": "other/2"}', "format='other/2'"),
        ('{"format": "pdserve-profile/1"}', "missing or malformed field (KeyError: 'model')"),
        ('{"format": "pdserve-profile/1", "model": "m", "device": "cpu", "points": 3}', "malformed field"),
    ],
)
def test_load_names_the_file_that_is_not_a_profile(tmp_path, content, says) -> None:
    p = tmp_path / "p.json"
    p.write_text(content)
    with pytest.raises(ValueError) as e:
        prof.load(p)
    assert str(e.value).startswith(f"{p}: ") and says in str(e.value), str(e.value)
