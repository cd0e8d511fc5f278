"""Fleet simulator: a fast, seeded, vectorised model of a multi-cloud fleet. :mod:`~balanceiq.sim.scenario` describes a
fleet and a timeline of events as data (YAML); :mod:`~balanceiq.sim.fleet` runs it into the
:class:`~balanceiq.telemetry.observation.Observation` live telemetry gives."""

from balanceiq.sim.fleet import FleetSim, StepResult
from balanceiq.sim.scenario import SCENARIOS, DemandSpec, EndpointSpec, Event, Scenario, load_scenario

__all__ = ["SCENARIOS", "DemandSpec", "EndpointSpec", "Event", "FleetSim", "Scenario", "StepResult", "load_scenario"]
