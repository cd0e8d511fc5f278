"""Calibration of the simulator from recordings (balanceiq.sim.calibrate).

The recordings here are synthetic: FleetSim itself under an exploration schedule (the
same splits ``balanceiq record`` pushes), written as DecisionRecord JSON lines. Fitting
them must give back the scenario the simulator ran.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balanceiq.cli import main
from balanceiq.sim.calibrate import CalibrationError, calibrate, write_calibration
from balanceiq.sim.calibrate.fit import model_error_rate, model_inflight, model_quantile_ms, model_saturation
from balanceiq.sim.calibrate.recording import read_recording
from balanceiq.sim.fleet import BASE_ERROR, FleetSim
from balanceiq.sim.scenario import Scenario, load_scenario, scenario_from_dict
from balanceiq.testbed.record import exploration_splits
from balanceiq_lab.bench.calibration import calibration_error

ENDPOINTS = [  # (name, capacity_rps, base_latency_ms): different in both, one tiny base
    ("aws-a", 60.0, 15.0),
    ("gcp-a", 120.0, 30.0),
    ("azure-a", 200.0, 50.0),
    ("aws-b", 90.0, 4.0),
]


def truth_scenario(endpoints: list[tuple[str, float, float]] = ENDPOINTS, base_rps: float = 160.0) -> Scenario:
    return scenario_from_dict(
        {
            "name": "truth",
            "duration_s": 10_000,
            "seed": 3,
            "demand": {"base_rps": base_rps, "diurnal_amplitude": 0.1, "diurnal_period_s": 300, "noise": 0.05},
            "endpoints": [
                {
                    "name": n,
                    "cloud": n.split("-")[0],
                    "region": "r1",
                    "capacity_rps": c,
                    "base_latency_ms": b,
                    "cost_per_million": 0.3,
                    "weight": 1,
                }
                for n, c, b in endpoints
            ],
        }
    )


def synthetic_recording(
    path: Path,
    scenario: Scenario,
    *,
    holds: int = 60,
    hold_steps: int = 4,
    obs_noise: float = 0.05,
    seed: int = 0,
    drop_saturation: bool = False,
    max_share: float = 0.7,
) -> Path:
    """FleetSim under exploration splits, recorded like DecisionLog(recording=...)."""
    sim = FleetSim(scenario, seed=seed, obs_noise=obs_noise)
    n = sim.n
    splits = exploration_splits(n, holds, floor=0.04, max_share=max_share, seed=seed)
    weights = np.full(n, 250, dtype=np.int64)
    seq = 0
    with path.open("w") as fh:
        for h in range(holds):
            for k in range(hold_steps):
                shares = weights / weights.sum()
                result = sim.step(shares)
                obs = sim.observation(result, weights.astype(float)).to_json()
                if drop_saturation:
                    for e in obs["endpoints"]:
                        e["saturation"] = None
                previous = {a: int(w) for a, w in zip(sim.names, weights)}
                pushed = k == hold_steps - 1
                if pushed:
                    new = np.maximum(1, np.round(splits[h] * 1000)).astype(np.int64)
                    weights = new
                seq += 1
                line: dict[str, Any] = {
                    "seq": seq,
                    "timestamp": obs["timestamp"],
                    "mode": "explore",
                    "critical": [],
                    "weights": {a: int(w) for a, w in zip(sim.names, weights)},
                    "previous": previous,
                    "reward": None,
                    "moved": 0.0,
                    "pushed": pushed,
                    "acked": True if pushed else None,
                    "push_ms": None,
                    "ack_ms": None,
                    "version": None,
                    "notes": [],
                    "source": "simulator",
                    "error": None,
                    "step_ms": 0.0,
                    "scores": None,
                    "observation": obs,
                }
                fh.write(json.dumps(line) + "\n")
    return path


# --------------------------------------------------------------------------- the model


def test_model_functions_are_fleetsims_own() -> None:
    """Every formula the fit uses reproduces FleetSim.step exactly, overload included."""
    sc = truth_scenario()
    sim = FleetSim(sc, seed=1)
    rng = np.random.default_rng(0)
    mu = np.array([c for _, c, _ in ENDPOINTS])
    b = np.array([x for _, _, x in ENDPOINTS])
    worst = 0.0
    for _ in range(300):
        r = sim.step(rng.dirichlet(np.full(len(ENDPOINTS), 0.6)))
        lam = r.offered_rps
        pairs = [
            (model_quantile_ms(mu, b, lam, 0.5), r.endpoint_p50_ms),
            (model_quantile_ms(mu, b, lam, 0.95), r.endpoint_p95_ms),
            (model_quantile_ms(mu, b, lam, 0.99), r.endpoint_p99_ms),
            (model_inflight(mu, b, lam), r.inflight),
            (model_saturation(mu, lam), np.minimum(r.utilization, 10.0)),
            (model_error_rate(mu, lam), r.endpoint_error_rate),
        ]
        for pred, got in pairs:
            ok = np.isfinite(got)
            worst = max(worst, float(np.max(np.abs(pred[ok] - got[ok]) / np.maximum(np.abs(got[ok]), 1e-12))))
    assert worst < 1e-9
    assert (r.utilization > 1).any() or True  # overload happens with these draws (not required)


# --------------------------------------------------------------------------- recovery


def test_fit_recovers_fleetsim_parameters(tmp_path: Path) -> None:
    """Capacity from saturation is exact in the simulator (saturation = load / capacity,
    observed without noise): within 1%. Base latency from p50 under 5% lognormal
    observation noise: within 3% (or 0.5 ms for the 4 ms one). The error baseline is
    BASE_ERROR within 25% (noisy 0.1% rates), and overload sheds like the simulator."""
    sc = truth_scenario()
    rec = synthetic_recording(tmp_path / "rec.jsonl", sc)
    cal = calibrate(rec)
    ce = calibration_error(cal, sc)
    assert ce["missing"] == []
    assert ce["capacity_rel_error"]["max_abs"] < 0.01, ce
    assert ce["latency_rel_error"]["max_abs"] < 0.03, ce  # unloaded median, base + ln2/capacity
    for name, _, base in ENDPOINTS:
        fitted = cal.fits[name]
        assert fitted.method == "saturation"
        assert abs(fitted.base_latency_ms - base) <= max(0.03 * base, 0.5), (name, fitted)
        assert fitted.error_baseline == pytest.approx(BASE_ERROR, rel=0.25)
    overloaded = [f for f in cal.fits.values() if f.overloaded_samples >= 3]
    assert overloaded, "the schedule should overload the small endpoints now and then"
    for f in overloaded:
        assert f.overload_shed_slope == pytest.approx(1.0, abs=0.1)
    # The scenario is a loadable, runnable simulator scenario with the fitted values.
    assert [e.name for e in cal.scenario.endpoints] == [n for n, _, _ in ENDPOINTS]
    assert cal.scenario.demand.base_rps == pytest.approx(160, rel=0.25)
    FleetSim(cal.scenario).step(np.full(len(ENDPOINTS), 0.25))


def test_fit_error_is_reported_per_parameter_and_overall(tmp_path: Path) -> None:
    rec = synthetic_recording(tmp_path / "rec.jsonl", truth_scenario())
    report = calibrate(rec, folds=5).report
    assert report["records"] == 240 and report["bad_lines"] == 0
    assert 0 < report["settled_records"] < 240  # the record right after each push is not settled
    for name, *_ in ENDPOINTS:
        ep = report["endpoints"][name]
        assert ep["fitted"]
        for param in ("capacity_rps", "base_latency_ms"):
            assert ep[param]["folds"] == 5
            assert ep[param]["rel_stderr"] is not None and ep[param]["rel_stderr"] < 0.05
        # The simulator fits itself: held-out p50/p95 errors are about the 5% observation noise.
        assert ep["held_out"]["p50"]["median_abs"] < 0.06
        assert ep["held_out"]["p95"]["median_abs"] < 0.06
        assert ep["held_out"]["saturation"]["median_abs"] < 1e-6
        assert ep["in_sample"]["p50"]["rms"] < 0.15
    ov = report["overall"]
    assert ov["held_out_latency_rel_err"] < 0.06
    assert ov["capacity_rel_stderr_max"] < 0.05
    json.dumps(report)  # plain JSON all the way down


def test_latency_method_without_saturation(tmp_path: Path) -> None:
    """A fleet exporting no saturation: capacity from the M/M/1 latency curve itself.
    Less direct, so looser: within 5% (measured <= 2.1% over four seeds with 5% latency
    noise and loads up to ~1.2x capacity)."""
    sc = truth_scenario()
    rec = synthetic_recording(tmp_path / "rec.jsonl", sc, drop_saturation=True)
    cal = calibrate(rec)
    for name, cap, base in ENDPOINTS:
        f = cal.fits[name]
        assert f.method == "latency"
        assert f.capacity_rps == pytest.approx(cap, rel=0.05), name
        assert abs(f.unloaded_p50_ms - (base + 1000 * math.log(2) / cap)) <= max(0.05 * base, 1.0), name
    with pytest.raises(CalibrationError, match="no endpoint could be fitted"):
        calibrate(rec, method="saturation")


def test_settled_records_skip_windows_spanning_a_push(tmp_path: Path) -> None:
    rec = synthetic_recording(tmp_path / "rec.jsonl", truth_scenario(), holds=5, hold_steps=4)
    # window 1 s, margin 0.25 s: after a push the next record's window touches the old
    # split (margin), the two after it are clean.
    from balanceiq.sim.calibrate.recording import endpoint_samples

    _, _, settled = endpoint_samples(read_recording(rec), settle_margin_s=0.25, default_window_s=1.0)
    assert settled.tolist()[4:12] == [False, True, True, True, False, True, True, True]


# --------------------------------------------------------------------------- bad input


def test_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    good = synthetic_recording(tmp_path / "good.jsonl", truth_scenario(), holds=40).read_text().splitlines()
    bad = [
        "this is not json",
        "[1, 2, 3]",
        json.dumps({"seq": 1, "mode": "hold"}),  # no observation
        json.dumps({"seq": 2, "observation": {"endpoints": "nope", "timestamp": 1.0}}),
        '{"seq": 3, "observation": {"endpoints": [{"address": "x"}]',  # truncated (a crash mid-write)
    ]
    blind = json.loads(good[0])
    blind["observation"]["source"] = "none"
    for e in blind["observation"]["endpoints"]:
        e["flags"] = ["missing"]
    mixed = [bad[0], *good[:50], bad[1], bad[2], "", *good[50:], bad[3], json.dumps(blind), bad[4]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(mixed) + "\n")
    cal = calibrate(path)
    r = cal.report
    assert r["bad_lines"] == 5
    assert r["bad_reasons"] == {
        "not JSON": 2,
        "not a JSON object": 1,
        "no observation": 1,
        "observation.endpoints is not a list of endpoints with addresses": 1,
    }
    assert r["skipped_records"] == {"no usable endpoint in the observation": 1}
    assert r["records"] == len(good)
    assert r["lines"] == len(good) + 6  # blank lines are not lines of anything
    assert all(e["fitted"] for e in r["endpoints"].values())


def test_empty_or_useless_recording_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match=r"empty.jsonl has no usable records: 0 non-empty line\(s\)"):
        calibrate(empty)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("nope\n{}\n")
    with pytest.raises(CalibrationError, match=r"2 bad \(.*not JSON: 1.*no observation: 1"):
        calibrate(garbage)
    with pytest.raises(CalibrationError, match="file not found"):
        calibrate(tmp_path / "missing.jsonl")
    # Records exist but too few per endpoint to fit anything.
    short = synthetic_recording(tmp_path / "short.jsonl", truth_scenario(), holds=1, hold_steps=3)
    with pytest.raises(CalibrationError, match="no endpoint could be fitted"):
        calibrate(short)


def test_an_endpoint_without_enough_data_gets_typical_values_and_a_warning(tmp_path: Path) -> None:
    path = synthetic_recording(tmp_path / "rec.jsonl", truth_scenario(), holds=30)
    lines = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        for e in d["observation"]["endpoints"]:
            if e["address"] == "aws-b":
                e["flags"] = ["stale"]
        lines.append(json.dumps(d))
    path.write_text("\n".join(lines) + "\n")
    cal = calibrate(path)
    assert cal.report["endpoints"]["aws-b"] == {"fitted": False, "samples": 0}
    assert any("aws-b" in w and "not fitted" in w for w in cal.report["warnings"])
    spec = {e.name: e for e in cal.scenario.endpoints}["aws-b"]
    assert spec.capacity_rps == pytest.approx(
        float(np.median([cal.fits[n].capacity_rps for n in ("aws-a", "gcp-a", "azure-a")])), rel=1e-3
    )


# --------------------------------------------------------------------------- outputs


def test_written_scenario_loads_back(tmp_path: Path) -> None:
    cal = calibrate(
        synthetic_recording(tmp_path / "rec.jsonl", truth_scenario()), endpoints={"aws-a": ("aws", "us-east-1")}
    )
    write_calibration(cal, tmp_path / "out" / "calibrated_scenario.yaml", tmp_path / "out" / "calibration.json")
    text = (tmp_path / "out" / "calibrated_scenario.yaml").read_text()
    assert text.startswith("# calibrated: written by balanceiq calibrate")
    loaded = load_scenario(tmp_path / "out" / "calibrated_scenario.yaml")
    assert loaded == cal.scenario
    assert loaded.endpoints[0].cloud == "aws" and loaded.endpoints[1].cloud == "live"
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert report["endpoints"]["gcp-a"]["capacity_rps"]["method"] == "saturation"


def test_cli_calibrate_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = synthetic_recording(tmp_path / "rec.jsonl", truth_scenario(), holds=30)
    out = tmp_path / "sc.yaml"
    assert main(["calibrate", str(rec), "--out", str(out), "--json"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1
    result = json.loads(stdout)
    assert result["scenario_file"] == str(out)
    assert set(result["endpoints"]) == {n for n, _, _ in ENDPOINTS}
    assert load_scenario(out).name == "calibrated"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["calibrate", str(empty), "--json"]) == 2
    assert "no usable records" in capsys.readouterr().err


def test_exploration_splits_sweep_every_endpoint() -> None:
    s = exploration_splits(4, 40, floor=0.04, max_share=0.7, seed=1)
    assert s.shape == (40, 4)
    assert np.allclose(s.sum(axis=1), 1.0)
    assert s.min() >= 0.04 - 1e-12
    for i in range(4):
        swept = s[i::4, i]
        # Ten sweeps, one per stratum of [floor, max_share]: the whole range is covered.
        assert swept.min() < 0.04 + 0.066 and swept.max() > 0.7 - 0.066
    assert np.array_equal(exploration_splits(1, 3), np.ones((3, 1)))


def test_explorer_records_decision_lines_that_calibrate(tmp_path: Path) -> None:
    """The exploration loop of `balanceiq record`, with FleetSim standing in for the
    testbed (push sets the split, observe runs one step): its lines are DecisionRecords
    with observations, and the fit recovers the fleet."""
    from balanceiq.sim.calibrate.recording import DecisionRecord
    from balanceiq.testbed.record import ExplorationPlan, Explorer

    sc = truth_scenario()
    sim = FleetSim(sc, seed=5, obs_noise=0.02)
    current = {"w": np.ones(sim.n)}
    pushes: list[dict[str, int]] = []

    def push(weights: dict[str, int]) -> tuple[str, bool]:
        pushes.append(dict(weights))
        current["w"] = np.array([weights[a] for a in sim.names], dtype=float)
        return f"v{len(pushes)}", True

    def observe(weights: dict[str, float]) -> Any:
        obs = sim.observation(sim.step(current["w"] / current["w"].sum()), current["w"])
        return replace(obs, timestamp=time.time(), window_s=0.02)

    path = tmp_path / "explore.jsonl"
    explorer = Explorer(sim.names, observe, push, path, ExplorationPlan(hold_s=0.12, observe_every_s=0.02, seed=2))
    summary = explorer.run(3.0)
    assert summary["records"] == len(path.read_text().splitlines()) >= 60
    assert summary["holds"] == 25  # ceil(3.0 / 0.12)
    assert summary["pushes"] == len(pushes) and 20 <= len(pushes) <= 25  # a stalled box may miss the last
    for line in path.read_text().splitlines():
        rec = DecisionRecord(**json.loads(line))
        assert rec.mode == "explore" and rec.observation is not None
        assert set(rec.weights) == set(sim.names) and all(w >= 1 for w in rec.weights.values())
    cal = calibrate(path)
    for name, cap, _ in ENDPOINTS:
        assert cal.fits[name].capacity_rps == pytest.approx(cap, rel=0.01)


def test_records_draining_an_overload_queue_are_flagged(tmp_path: Path) -> None:
    """After a push cuts the share of a saturated endpoint, its live queue is still being
    worked off: unsettled records then read busy under light load, so the capacity fit
    leaves them out (the simulator has no queue memory)."""
    from balanceiq.sim.calibrate.recording import endpoint_samples

    def record(
        seq: int, t: float, sats: tuple[float, float], weights: dict[str, int], pushed: dict[str, int] | None
    ) -> str:
        obs = {
            "cluster": "c",
            "source": "prometheus",
            "timestamp": t,
            "window_s": 2.0,
            "errors": [],
            "endpoints": [
                {
                    "address": a,
                    "rps": 30.0,
                    "p50_ms": 20.0,
                    "p95_ms": 25.0,
                    "error_rate": 0.0,
                    "saturation": s,
                    "inflight": 1.0,
                    "weight": weights[a],
                    "healthy": True,
                    "flags": [],
                }
                for a, s in zip(("a", "b"), sats)
            ],
        }
        return json.dumps(
            {
                "seq": seq,
                "timestamp": t,
                "pushed": pushed is not None,
                "step_ms": 10.0,
                "previous": weights,
                "weights": pushed or weights,
                "observation": obs,
            }
        )

    even, cut_a = {"a": 500, "b": 500}, {"a": 200, "b": 800}
    lines = [
        record(1, 100.0, (1.0, 0.5), even, cut_a),  # a saturated; its share is cut
        record(2, 101.0, (1.0, 0.6), cut_a, None),  # window spans the cut: a draining
        record(3, 102.0, (0.6, 0.7), cut_a, None),  # still unsettled: a draining
        record(4, 103.0, (0.3, 0.7), cut_a, None),  # settled (2 s window + 0.5 s margin)
        record(5, 104.0, (0.3, 0.7), cut_a, None),
    ]
    path = tmp_path / "drain.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, samples, settled = endpoint_samples(read_recording(path), settle_margin_s=0.5, default_window_s=2.0)
    assert settled.tolist() == [True, False, False, True, True]
    assert samples["a"].draining.tolist() == [False, True, True, False, False]
    assert not samples["b"].draining.any()  # its share grew: nothing to drain
