"""Calibrate the simulator from a recording of live telemetry (``balanceiq record``): FleetSim's
parameters fitted per endpoint, and a report of the fit error. The fitted M/M/1 scenario cannot
reproduce (the report shows it) a multi-slot backend's flatter-then-sharper latency, per-endpoint
errors, queueing instead of shedding, or memory (a live queue built in overload drains afterwards)."""

from balanceiq.sim.calibrate.calibration import Calibration, calibrate, fit_summary, write_calibration
from balanceiq.sim.calibrate.recording import CalibrationError

__all__ = ["Calibration", "CalibrationError", "calibrate", "fit_summary", "write_calibration"]
