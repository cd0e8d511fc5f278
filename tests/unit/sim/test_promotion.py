"""The promotion gate: better on average, and not much worse anywhere."""

from __future__ import annotations

from balanceiq.sim.evaluate import promotion_decision


def _ev(**per: tuple[float, float]) -> dict:  # type: ignore[type-arg]
    sc = {k: {"candidate": c, "serving": s} for k, (c, s) in per.items()}
    return {
        "scenarios": sc,
        "candidate": sum(c for c, _ in per.values()) / len(per),
        "serving": sum(s for _, s in per.values()) / len(per),
    }


def test_better_everywhere_is_promoted() -> None:
    ok, why = promotion_decision(_ev(a=(-1.0, -1.2), b=(-20.0, -21.0)))
    assert ok and why.startswith("promoted")


def test_equal_is_not_promoted() -> None:
    ok, why = promotion_decision(_ev(a=(-1.0, -1.0), b=(-20.0, -20.0)))
    assert not ok and "needs >" in why


def test_a_big_regression_on_one_scenario_blocks() -> None:
    # Far better on average, but 50% worse on b.
    ok, why = promotion_decision(_ev(a=(-0.1, -2.0), b=(-3.0, -2.0)))
    assert not ok and "worse on b" in why


def test_relative_gains_so_large_scales_do_not_dominate() -> None:
    # +5 absolute on a scale of 100 (5%) vs -0.5 on a scale of 1 (-50%): not promoted.
    ok, _ = promotion_decision(_ev(a=(-95.0, -100.0), b=(-1.5, -1.0)))
    assert not ok


def test_non_finite_is_rejected() -> None:
    ok, why = promotion_decision(_ev(a=(float("nan"), -1.0)))
    assert not ok and "non-finite" in why
