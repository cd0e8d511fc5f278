"""Calibrate the simulator from recorded live telemetry.

Input: a recording, one JSON line per control step with its full observation
(``Controller(recording=...)``, ``balanceiq record``). Output: a
:class:`~balanceiq.sim.scenario.Scenario` whose endpoints carry FleetSim's parameters
fitted one by one (:mod:`.fit`, against the closed forms in :mod:`.model`), and a report
of the fit error: held out by blocked cross-validation, jackknife standard errors per
parameter, in-sample residuals (:mod:`.validation`). Against a known truth (the testbed,
or a simulator): :func:`calibration_error`.

What the fitted scenario cannot reproduce, and the report shows: the shape of queueing
(M/M/1 puts all service time in an exponential sojourn, so a backend with several slots
and steady service times stays flatter, then turns more sharply); per-endpoint error
rates, and queueing instead of shedding; and memory (a live queue built in overload
drains afterwards, while each simulator step is stationary).
"""

from balanceiq.sim.calibrate.calibration import Calibration, calibrate
from balanceiq.sim.calibrate.fit import EndpointFit, fit_endpoint
from balanceiq.sim.calibrate.model import model_error_rate, model_inflight, model_quantile_ms, model_saturation
from balanceiq.sim.calibrate.output import fit_summary, scenario_yaml, write_calibration
from balanceiq.sim.calibrate.recording import CalibrationError, Recording, endpoint_samples, read_recording
from balanceiq.sim.calibrate.truth import backend_truth, calibration_error

__all__ = [
    "Calibration",
    "CalibrationError",
    "EndpointFit",
    "Recording",
    "backend_truth",
    "calibrate",
    "calibration_error",
    "endpoint_samples",
    "fit_endpoint",
    "fit_summary",
    "model_error_rate",
    "model_inflight",
    "model_quantile_ms",
    "model_saturation",
    "read_recording",
    "scenario_yaml",
    "write_calibration",
]
