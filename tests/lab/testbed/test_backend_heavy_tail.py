"""Heavy-tailed testbed backends: ``sigma`` (lognormal service time), and per-backend
``sigma`` / ``tail_prob`` / ``tail_ms`` in the config's testbed profiles."""

from __future__ import annotations

import math
import time
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from balanceiq.config import EndpointConfig, Settings, TestbedConfig, load_config
from balanceiq.exceptions import ConfigError
from balanceiq_lab.testbed.backend import CONTROL_FIELDS, Backend, BackendSettings, mean_service_ms, true_capacity_rps
from balanceiq_lab.testbed.profiles import behaviour_for, profile_for
from balanceiq_lab.testbed.scenario import LiveEvent
from balanceiq_lab.testbed.testbed import backend_specs

REPO = Path(__file__).resolve().parents[3]


def _settings(**kw: object) -> BackendSettings:
    values: dict[str, object] = {
        "name": "b1",
        "port": 0,
        "cloud": "aws",
        "region": "r",
        "base_latency_ms": 20.0,
        "jitter_ms": 0.0,
        "concurrency": 64,
    }
    values.update(kw)
    return BackendSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, 3.01, math.nan, math.inf, True, "0.5", None])
def test_sigma_is_validated(bad: object) -> None:
    assert CONTROL_FIELDS["sigma"](bad) is not None
    with pytest.raises(ConfigError) as info:
        _settings(sigma=bad)
    assert [p for p, _ in info.value.problems] == ["sigma"]
    with pytest.raises(ValidationError):
        LiveEvent.model_validate({"at_s": 1, "name": "x", "cloud": "aws", "set": {"sigma": bad}})


@pytest.mark.parametrize("ok", [0, 0.0, 0.5, 3])
def test_sigma_in_range_is_accepted(ok: float) -> None:
    assert CONTROL_FIELDS["sigma"](ok) is None
    assert _settings(sigma=ok).sigma == ok
    LiveEvent.model_validate({"at_s": 1, "name": "x", "cloud": "aws", "set": {"sigma": ok}})


def test_default_is_the_old_fixed_delay() -> None:
    assert _settings().sigma == 0.0
    assert mean_service_ms(20.0) == pytest.approx(20.5)  # + jitter 1 ms / 2
    assert mean_service_ms(20.0, sigma=0.5, jitter_ms=0.0) == pytest.approx(20.0 * math.exp(0.125))
    assert mean_service_ms(10.0, extra_latency_ms=10.0, jitter_ms=2.0, tail_prob=0.1, tail_ms=200.0) == pytest.approx(
        41.0
    )
    assert true_capacity_rps(4, 20.0) == pytest.approx(200.0) and true_capacity_rps(1, 0.0) == math.inf


async def _latencies(backend: Backend, n: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(backend.url + "/") as resp:
            await resp.read()  # connection setup is not what is measured

        async def one() -> float:
            t0 = time.perf_counter()
            async with session.get(backend.url + "/") as resp:
                await resp.read()
                assert resp.status == 200
            return (time.perf_counter() - t0) * 1000

        return [await one() for _ in range(n)]  # one at a time: no client-side queueing


async def test_sigma_spreads_the_service_time_around_its_median() -> None:
    b = Backend(_settings(base_latency_ms=20.0, sigma=1.0, seed=7))
    await b.start()
    try:
        lat = sorted(await _latencies(b, 30))
    finally:
        await b.stop()
    # exp(N(0,1)) x 20 ms: ~1/3 under 13 ms, ~1/5 over 45 ms; a fixed delay has neither.
    assert sum(x < 15.0 for x in lat) >= 2, lat
    assert sum(x > 45.0 for x in lat) >= 2, lat
    assert 8.0 < lat[len(lat) // 2] < 20.0 + 500.0


def test_testbed_profiles_carry_the_tail() -> None:
    tb = TestbedConfig(
        overrides={
            "10.0.0.1:80": {"base_latency_ms": 40, "sigma": 0.5, "tail_prob": 0.02, "tail_ms": 300},
            "10.0.0.2:80": {"concurrency": 2},
        }
    )
    a = EndpointConfig(address="10.0.0.1:80", cloud="aws", region="r")
    b = EndpointConfig(address="10.0.0.2:80", cloud="gcp", region="r")
    assert profile_for(tb, a) == (40.0, 8, 0.0)  # unchanged three-tuple
    assert behaviour_for(tb, a) == {
        "base_latency_ms": 40.0,
        "concurrency": 8,
        "error_rate": 0.0,
        "sigma": 0.5,
        "tail_prob": 0.02,
        "tail_ms": 300.0,
    }
    assert behaviour_for(tb, b) == {"base_latency_ms": 25.0, "concurrency": 2, "error_rate": 0.0}
    for bad in ({"sigma": 4}, {"sigma": -1}, {"tail_prob": 1.5}, {"tail_ms": -5}, {"sigma": math.nan}):
        with pytest.raises(ValidationError):
            TestbedConfig(overrides={"10.0.0.1:80": bad})


def test_backend_specs_pass_the_tail_and_keep_old_configs_as_they_were() -> None:
    base = load_config(REPO / "balanceiq.yaml")
    specs = backend_specs(base)
    assert all("sigma" not in s and "tail_prob" not in s for s in specs)  # as before: the backends' defaults
    assert specs[5]["base_latency_ms"] == 120.0 and specs[5]["concurrency"] == 4 and specs[5]["error_rate"] == 0.02
    data = base.model_dump()
    data["testbed"]["overrides"]["127.0.0.1:18001"] = {"sigma": 0.4, "tail_prob": 0.01, "tail_ms": 250.0}
    tailed = backend_specs(Settings.model_validate(data))
    assert (tailed[0]["sigma"], tailed[0]["tail_prob"], tailed[0]["tail_ms"]) == (0.4, 0.01, 250.0)
    assert tailed[0]["base_latency_ms"] == 15.0  # the cloud's latency still applies
    for s in tailed:
        BackendSettings.from_dict(s)  # the backend process accepts every spec
