"""Calibrate the simulator from a recording of live telemetry (``balanceiq record``):
FleetSim's parameters fitted per endpoint, and a report of the fit error. What the fitted
M/M/1 scenario cannot reproduce, and the report shows: a backend with several slots and
steady service stays flatter, then turns more sharply; per-endpoint error rates, and
queueing instead of shedding; memory (a live queue built in overload drains afterwards,
while each simulator step is stationary).
"""

from balanceiq.sim.calibrate.calibration import Calibration, calibrate, fit_summary, write_calibration
from balanceiq.sim.calibrate.recording import CalibrationError

__all__ = ["Calibration", "CalibrationError", "calibrate", "fit_summary", "write_calibration"]
