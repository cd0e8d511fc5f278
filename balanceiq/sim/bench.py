"""Simulator throughput: how many steps per second one core runs."""

from __future__ import annotations

import time

from balanceiq.sim.fleet import FleetSim

__all__ = ["steps_per_second"]


def steps_per_second(scenario_name: str = "steady", n_steps: int = 20000) -> float:
    """Steps per second of :meth:`FleetSim.step` on ``scenario_name`` under its static split.

    Runs past the scenario's duration if ``n_steps`` asks for it (the simulator allows
    that); a short warm-up is not timed.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    sim = FleetSim(scenario_name)
    shares = sim.static_weights / sim.static_weights.sum()
    for _ in range(min(200, n_steps)):
        sim.step(shares)
    sim.reset()
    step = sim.step
    start = time.perf_counter()
    for _ in range(n_steps):
        step(shares)
    elapsed = time.perf_counter() - start
    return n_steps / elapsed if elapsed > 0 else float("inf")
