"""Writing a calibration: the scenario YAML with a summary header, the report, a terminal summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from balanceiq.sim.calibrate.calibration import Calibration


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def scenario_yaml(cal: Calibration) -> str:
    """The scenario as YAML (loadable by :func:`~balanceiq.sim.scenario.load_scenario`),
    with a header comment summarising the fit."""
    data = cal.scenario.model_dump(mode="json")
    rep = cal.report
    head = [
        f"# {cal.scenario.name}: written by balanceiq calibrate from {rep['recording']}",
        f"# {rep['records']} records ({rep['bad_lines']} bad lines skipped), {rep['settled_records']} settled; "
        f"held-out median latency error {pct(rep['overall']['held_out_latency_rel_err'])}.",
        "# Per endpoint: capacity_rps is the M/M/1 service rate, base_latency_ms its fixed part;",
        "# errors (not in the scenario format) are in the fit report:",
    ]
    for a, e in rep["endpoints"].items():
        if not e.get("fitted"):
            head.append(f"#   {a}: NOT FITTED ({e.get('samples', 0)} records): typical values used")
            continue
        cap, base = e["capacity_rps"], e["base_latency_ms"]
        head.append(
            f"#   {a}: capacity {cap['value']:.1f} rps (+-{pct(cap['rel_stderr'])}, {cap['method']}), "
            f"base {base['value']:.1f} ms (+-{pct(base['rel_stderr'])}), error baseline {e['errors']['baseline']}"
        )
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=200)


def fit_summary(report: Mapping[str, Any]) -> str:
    """A few lines of fit error for a terminal: per endpoint and overall."""
    held = report["overall"].get("held_out") or {}

    def med(sig: str) -> str:
        v = held.get(sig)
        return "n/a" if not v else (pct(v["median_abs"]) if v["kind"] == "relative" else f"{v['median_abs']:.3f}")

    lines = [
        f"calibrated from {report['recording']}: {report['records']} records "
        f"({report['bad_lines']} bad lines skipped, {report['settled_records']} settled)",
        f"  held-out error (median, {report['folds']} time blocks): p50 {med('p50')}, p95 {med('p95')}, "
        f"in-flight {med('inflight')}, saturation {med('saturation')} abs, error rate {med('error_rate')} abs",
    ]
    for a, e in report["endpoints"].items():
        if not e.get("fitted"):
            lines.append(f"  {a}: not fitted ({e.get('samples', 0)} usable records)")
            continue
        cap, base, util = e["capacity_rps"], e["base_latency_ms"], e["utilization"]
        lines.append(
            f"  {a}: capacity {cap['value']:.1f} rps +-{pct(cap['rel_stderr'])} ({cap['method']}), "
            f"base latency {base['value']:.1f} ms +-{pct(base['rel_stderr'])}, "
            f"unloaded p50 {e['unloaded_p50_ms']:.1f} ms, utilisation {util[0]:.2f}-{util[1]:.2f}"
        )
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_calibration(cal: Calibration, scenario_path: Path | str, report_path: Path | str | None = None) -> None:
    """Write the scenario YAML (and the report JSON)."""
    sp = Path(scenario_path)
    sp.parent.mkdir(parents=True, exist_ok=True)
    sp.write_text(scenario_yaml(cal), encoding="utf-8")
    if report_path is not None:
        rp = Path(report_path)
        rp.parent.mkdir(parents=True, exist_ok=True)
        rp.write_text(json.dumps(cal.report, indent=1), encoding="utf-8")
