"""The lab's commands, added to `balanceiq` by the ``balanceiq.cli`` entry point:
``balanceiq bench ...`` (benchmarks, each prints one JSON object with ``--json``),
``balanceiq demo`` and ``balanceiq cluster check``. They reuse the product CLI's console, config
loading and error handling, so a bad argument is still one line on stderr and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, TypedDict

import typer
from rich.console import Console

from balanceiq.cli import ConfigOpt, _emit, _settings, err, out

bench_app = typer.Typer(help="Benchmarks; each prints one JSON object with --json.", no_args_is_help=True)
cluster_app = typer.Typer(help="Ray cluster launcher configs (cluster.yaml, cluster-local.yaml).", no_args_is_help=True)


@cluster_app.command("check")
def cluster_check(
    file: Annotated[Path, typer.Argument(help="Ray cluster config (ray up / --autoscaling-config).")],
) -> None:
    """Validate with Ray's own schema and prepare_config (no cloud calls): OK, or every problem (exit 2)."""
    from balanceiq_lab.cluster import cluster_check_command

    raise typer.Exit(cluster_check_command(file))


def demo(
    config: ConfigOpt = None,
    scenario: Annotated[str, typer.Option(help="Live scenario: a shipped name or a YAML file.")] = "degrade_and_dearer",
    rate: Annotated[
        float, typer.Option(help="Requests per second through Envoy (open loop, bounded).", min=1, max=2000)
    ] = 150.0,
    out_dir: Annotated[Path, typer.Option(help="Where the report and plot go.")] = Path("artifacts"),
    scripted: Annotated[bool, typer.Option(help="The actuator alone: a scripted weight schedule, no policy.")] = False,
    requests_per_phase: Annotated[
        int, typer.Option("--requests", help="--scripted: requests per phase (bounded).")
    ] = 1500,
    clusters: Annotated[
        int, typer.Option(help="2: add a second cluster (checkout, 3 backends) steered beside the first.", min=1, max=2)
    ] = 1,
) -> None:
    """The whole loop locally: testbed in 3 clouds, Serve app with the policy, a live scenario, load."""
    settings = _settings(config)
    if clusters == 2 and len(settings.clusters) == 1:
        from balanceiq_lab.demo import with_second_cluster

        settings = with_second_cluster(settings)
    if scripted:
        from balanceiq_lab.demo_scripted import run_demo as run_scripted

        run_scripted(settings, requests_per_phase=requests_per_phase, out_dir=out_dir, console=err)
        return
    from balanceiq_lab.demo import run_demo
    from balanceiq_lab.testbed.scenario import load_live_scenario

    report = run_demo(settings, load_live_scenario(scenario), rate_rps=rate, out_dir=out_dir, console=err, out=out)
    if report["interrupted"]:
        raise typer.Exit(130)


@bench_app.command("xds")
def bench_xds(
    streams: Annotated[
        int, typer.Option(help="Simulated ADS clients (real gRPC streams), besides one real Envoy.")
    ] = 0,
    endpoints: Annotated[int, typer.Option(help="Endpoints in the cluster.")] = 6,
    pushes: Annotated[int, typer.Option(help="Weight pushes to time.")] = 50,
    api: Annotated[str, typer.Option(help="xDS flavour for all clients: ads-sotw | ads-delta.")] = "ads-sotw",
    compare: Annotated[
        bool, typer.Option(help="Also run the other flavour in the same run; report both and their ratios.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Push→ACK, push→applied, fan-out and server memory against a real Envoy."""
    from balanceiq_lab.bench.xds import run_xds_bench, side_by_side

    result = run_xds_bench(streams=streams, endpoints=endpoints, pushes=pushes, api=api, console=err)
    if compare:
        other = "ads-delta" if api == "ads-sotw" else "ads-sotw"
        result = side_by_side(
            result, run_xds_bench(streams=streams, endpoints=endpoints, pushes=pushes, api=other, console=err)
        )
    _emit(result, as_json)


@bench_app.command("sim")
def bench_sim(
    scenarios: Annotated[
        str | None, typer.Option(help="Comma-separated shipped scenario names (default: all).")
    ] = None,
    scenario_file: Annotated[list[Path] | None, typer.Option(help="A scenario YAML of your own (repeatable).")] = None,
    policies: Annotated[
        str | None, typer.Option(help="Comma-separated policies (default: all baselines, cfr_rl, oracle).")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Policy checkpoint (default: the shipped one).")] = None,
    seed: Annotated[int, typer.Option(help="Seed shared by every policy.")] = 0,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of weights and p99 over time here.")] = None,
    plot_scenario: Annotated[str, typer.Option(help="Scenario to plot.")] = "degrade",
    balancer: Annotated[
        str, typer.Option(help="Envoy's balancer under the controller's weights: least_request, round_robin, cswrr.")
    ] = "least_request",
    suite: Annotated[
        int | None, typer.Option(help="Instead: the twins of `bench live --suite N` fleets, every suite arm.")
    ] = None,
    suite_seed: Annotated[int, typer.Option(help="With --suite: the suite's --seed.")] = 0,
    live: Annotated[
        Path | None, typer.Option(help="With --suite: a `bench live --suite --json` result to compare with.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Every policy on every scenario: latency, errors, cost, reward, performance ratio."""
    from balanceiq_lab.bench.sim import run_sim_bench

    if suite is not None:
        from balanceiq_lab.bench.twin import run_twin_suite
        from balanceiq_lab.errors import BenchError

        measured = None
        if live is not None:
            try:
                measured = json.loads(live.read_text())
            except (OSError, ValueError) as exc:
                raise BenchError(f"--live {live}: {exc}") from exc
        arms = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
        _emit(run_twin_suite(suite, suite_seed, arms=arms, live=measured, checkpoint=checkpoint, console=err), as_json)
        return

    names = [s.strip() for s in scenarios.split(",") if s.strip()] if scenarios else []
    names += [str(f) for f in scenario_file or []]
    result = run_sim_bench(
        scenarios=names or None,
        policies=[p.strip() for p in policies.split(",") if p.strip()] if policies else None,
        checkpoint=checkpoint,
        seed=seed,
        plot=plot,
        plot_scenario=plot_scenario,
        balancer=balancer,
        console=err,
    )
    _emit(result, as_json, omit=("results",))


@bench_app.command("train")
def bench_train(
    iterations: Annotated[int, typer.Option(help="Timed PPO iterations per runner count.")] = 4,
    target_iterations: Annotated[int, typer.Option(help="Iteration budget to reach the target reward.")] = 40,
    calibration_s: Annotated[float, typer.Option(help="Seconds of live exploration recorded for calibration.")] = 60.0,
    throughput_only: Annotated[
        bool, typer.Option("--throughput-only", help="Only env steps/s, 1 vs 2 runners.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """PPO sample throughput (1 vs 2 env runners), seconds to a target reward, calibration error."""
    from balanceiq_lab.bench.train import run_full_train_bench, run_train_bench

    if throughput_only:
        result = run_train_bench(iterations=iterations, console=err)
    else:
        result = run_full_train_bench(
            iterations=iterations, target_iterations=target_iterations, calibration_s=calibration_s, console=err
        )
    _emit(result, as_json)


@bench_app.command("telemetry")
def bench_telemetry(
    endpoints: Annotated[int, typer.Option(help="Sample backends (endpoints) in the cluster.")] = 100,
    samples: Annotated[int, typer.Option(help="Observations to time from each source.")] = 20,
    rate: Annotated[float, typer.Option(help="Background load, requests/s through Envoy.")] = 250.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Observation time, staleness and accuracy vs injected truth; ALS overhead."""
    from balanceiq_lab.bench.telemetry import run_telemetry_bench

    result = run_telemetry_bench(endpoints=endpoints, samples=samples, rate_rps=rate, console=err)
    _emit(result, as_json)


class _ServeBenchArgs(TypedDict):
    """What ``bench serve`` passes to run_serve_bench and run_serve_compare alike."""

    endpoints: int
    duration_s: float
    rate_rps: float
    calls: int
    also_rate_rps: float | None
    console: Console


@bench_app.command("serve")
def bench_serve(
    endpoints: Annotated[int, typer.Option(help="Endpoints per scoring request (N).")] = 64,
    duration: Annotated[float, typer.Option(help="Seconds of open-loop API load.")] = 30.0,
    rate: Annotated[float, typer.Option(help="API requests/s of the open-loop load.")] = 200.0,
    calls: Annotated[int, typer.Option(help="Timed inference calls per method (handle, HTTP, concurrent).")] = 500,
    also_rate: Annotated[
        float | None, typer.Option(help="An earlier API phase at this rate too (req/s), e.g. 100.")
    ] = None,
    direct_ingress: Annotated[
        bool,
        typer.Option(
            "--direct-ingress",
            help="Ray Serve's experimental direct ingress: the Controller replica serves HTTP itself.",
        ),
    ] = False,
    ingress: Annotated[
        str | None,
        typer.Option(
            help="Ingress: replica_server (default, as serve_app.yaml starts it: the Controller replica's own server on api.port), proxy (Serve's proxy only) or direct_ingress."
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Every ingress mode one after the other, each with a fresh Ray; ratios to the proxy."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """The Serve app: policy inference (handle, HTTP, batched), API under load, decision loop."""
    from balanceiq_lab.bench.serve import run_serve_bench, run_serve_compare
    from balanceiq_lab.errors import BenchError

    if compare and direct_ingress:
        raise BenchError("--compare runs both modes; leave out --direct-ingress")
    kw: _ServeBenchArgs = {
        "endpoints": endpoints,
        "duration_s": duration,
        "rate_rps": rate,
        "calls": calls,
        "also_rate_rps": also_rate,
        "console": err,
    }
    result = run_serve_compare(**kw) if compare else run_serve_bench(direct_ingress=direct_ingress, mode=ingress, **kw)
    _emit(result, as_json)


def _bench_suite(
    suite: int,
    arms: str | None,
    duration: float | None,
    rate: float | None,
    warmup: float | None,
    seed: int,
    only: str | None,
    record: Path | None,
    slo_ms: float,
    plot: Path | None,
    private_gauges: bool,
    config: Path | None,
    as_json: bool,
) -> None:
    """``bench live --suite N``: N seeded random fleets."""
    from balanceiq_lab.bench.suite import (
        DEFAULT_RATE_RANGE,
        DEFAULT_SUITE_DURATION_S,
        DEFAULT_SUITE_WARMUP_S,
        parse_suite_arms,
        run_live_suite,
    )
    from balanceiq_lab.errors import BenchError

    try:
        only_idx = [int(x) for x in only.split(",") if x.strip()] if only else None
    except ValueError as exc:
        raise BenchError(f"--only takes comma-separated fleet indices such as 0,3, got {only!r}") from exc
    result = run_live_suite(
        _settings(config),
        suite,
        seed=seed,
        arms=parse_suite_arms(arms),
        duration_s=DEFAULT_SUITE_DURATION_S if duration is None else duration,
        warmup_s=DEFAULT_SUITE_WARMUP_S if warmup is None else warmup,
        rate_rps_range=DEFAULT_RATE_RANGE if rate is None else (rate, rate),
        slo_ms=slo_ms,
        plot_path=plot or Path("artifacts/bench-live-suite.png"),
        private_gauges=private_gauges,
        console=err,
        only=only_idx,
        record_dir=record,
    )
    _emit(result, as_json, omit=("fleets",))


@bench_app.command("live")
def bench_live(
    scenario: Annotated[
        str | None,
        typer.Option(
            help="Live scenario: a shipped name or a YAML file (format: lab/balanceiq_lab/testbed/scenario.py). Default degrade_and_dearer; not with --suite."
        ),
    ] = None,
    arms: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated arms (default all; with --suite: round_robin, least_request, cswrr, balanceiq_rr, balanceiq_lr, oracle): round_robin, least_request, cswrr, static_cost_aware, balanceiq_rr, balanceiq_lr, oracle; only when named: balanceiq_lr_knee50 (the LP's knee at 0.5, the default until session 18)."
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            help="Measured seconds per arm; the scenario's timeline is scaled to fit. Default 60 (30 with --suite)."
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Open-loop arrivals per second through Envoy (same schedule for every arm). Default 150; with --suite each fleet draws its rate in 100..200 unless this fixes it."
        ),
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option(help="Seconds of steady traffic before the scenario, not measured. Default 12 (10 with --suite)."),
    ] = None,
    arrivals: Annotated[str, typer.Option(help="poisson (seeded) or constant.")] = "poisson",
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the arrival schedule (shared by every arm); with --suite, fleet i is drawn (and loaded) with seed S*1000+i."
        ),
    ] = 0,
    suite: Annotated[
        int | None,
        typer.Option(
            "--suite",
            help="Run N seeded random fleets the project has never seen (1..50) instead of one scenario; see lab/balanceiq_lab/bench/suite.py.",
        ),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="With --suite: comma-separated fleet indices (0-based) to run, drawn as in the whole suite (re-run one fleet).",
        ),
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="With --suite: a directory for each BalanceIQ arm's decisions with their observations (<fleet seed>-<arm>.jsonl).",
        ),
    ] = None,
    slo_ms: Annotated[float, typer.Option("--slo-ms", help="Latency SLO for slo_attainment (ms).")] = 150.0,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="PNG of p99 latency (and cost) over time per arm, events marked (default artifacts/bench-live.png); with --suite each arm's p99 and cost relative to LEAST_REQUEST per fleet (default artifacts/bench-live-suite.png)."
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="First measure the rate this box sustains and the generator's overhead (never with --suite).",
        ),
    ] = True,
    private_gauges: Annotated[
        bool,
        typer.Option(
            "--private-gauges",
            help="Let BalanceIQ read the testbed backends' in-flight/concurrency gauges (saturation); off by default, as a real backend exports neither.",
        ),
    ] = False,
    orca: Annotated[
        bool,
        typer.Option(
            "--orca",
            help="Let BalanceIQ read the backends' ORCA load reports (the shipped saturation query, what CSWRR reads); not with --suite.",
        ),
    ] = False,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """BalanceIQ vs Envoy's balancers on one live scenario (or --suite N random fleets): p50/p99/p99.9, errors, cost, SLO attainment per arm."""
    from balanceiq_lab.errors import BenchError

    if suite is None and (only is not None or record is not None):
        raise BenchError("--only and --record go with --suite")
    if suite is not None:
        if scenario is not None:
            raise BenchError("--suite draws its own fleets and events; leave out --scenario")
        if arrivals != "poisson":
            raise BenchError("--suite uses Poisson arrivals seeded per fleet; leave out --arrivals")
        if orca:
            raise BenchError("--orca is for one scenario; the suite states its targets without it")
        _bench_suite(
            suite, arms, duration, rate, warmup, seed, only, record, slo_ms, plot, private_gauges, config, as_json
        )
        return
    from balanceiq_lab.bench.live import parse_arms, run_live_bench
    from balanceiq_lab.testbed.scenario import DEFAULT as DEFAULT_SCENARIO
    from balanceiq_lab.testbed.scenario import load_live_scenario

    name = scenario or DEFAULT_SCENARIO
    result = run_live_bench(
        _settings(config),
        load_live_scenario(name),
        arms=parse_arms(arms),
        rate_rps=150.0 if rate is None else rate,
        duration_s=60.0 if duration is None else duration,
        warmup_s=12.0 if warmup is None else warmup,
        arrivals=arrivals,
        seed=seed,
        slo_ms=slo_ms,
        plot_path=plot or Path("artifacts/bench-live.png"),
        calibrate=calibrate,
        scenario_file=name,
        console=err,
        private_gauges=private_gauges,
        orca=orca,
    )
    _emit(result, as_json, omit=("arms",))


@bench_app.command("faults")
def bench_faults(
    faults: Annotated[
        str | None,
        typer.Option(
            "--faults",
            help="Comma-separated (default all): envoy_restarted, prometheus_killed, backend_killed, actor_killed, serve_replica_killed, ray_head_restart.",
        ),
    ] = None,
    rate: Annotated[
        float, typer.Option(help="Open-loop requests/s through Envoy during each fault (loopback, bounded).")
    ] = 100.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout, keyed by fault name.")
    ] = False,
) -> None:
    """Break one part at a time under load (Envoy, Prometheus, a backend, the xDS actor, the Serve replica, the Ray head): failed requests, recovery, invalid weights sent."""
    from balanceiq_lab.bench.faults import run_faults

    _emit(run_faults(faults, rate_rps=rate, console=err), as_json)


@bench_app.command("api-load")
def bench_api_load(
    rate: Annotated[float, typer.Option(help="API requests/s, open loop at a fixed rate (loopback only).")] = 200.0,
    duration: Annotated[float, typer.Option(help="Seconds of API load.")] = 60.0,
    background_rps: Annotated[
        float,
        typer.Option(
            "--background-rps", help="Requests/s through Envoy meanwhile, so the controller sees real traffic."
        ),
    ] = 50.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """The API (uvicorn, real ControlPlane over a live stack) at a fixed rate: errors, latency, server CPU and memory."""
    from balanceiq_lab.bench.load import run_api_load

    _emit(
        run_api_load(rate_rps=rate, duration_s=duration, background_rps=background_rps, console=err),
        as_json,
        omit=("by_route",),
    )


@bench_app.command("xds-soak")
def bench_xds_soak(
    streams: Annotated[
        int, typer.Option(help="Simulated ADS clients (real gRPC streams), besides one real Envoy.")
    ] = 1000,
    duration: Annotated[float, typer.Option(help="Seconds of pushing.")] = 60.0,
    push_interval: Annotated[float, typer.Option("--push-interval", help="Seconds between weight pushes.")] = 1.0,
    endpoints: Annotated[int, typer.Option(help="Endpoints in the cluster.")] = 50,
    warmup: Annotated[float, typer.Option(help="Memory growth is measured from this mark (s) to the end.")] = 10.0,
    api: Annotated[str, typer.Option(help="xDS flavour for all clients: ads-sotw | ads-delta.")] = "ads-sotw",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Many xDS streams, a push every interval: every push ACKed by every stream, and the server's memory over time."""
    from balanceiq_lab.bench.load import run_xds_soak

    result = run_xds_soak(
        streams=streams,
        duration_s=duration,
        push_interval_s=push_interval,
        endpoints=endpoints,
        warmup_s=warmup,
        api=api,
        console=err,
    )
    _emit(result, as_json, omit=("rss_mb",))


def register(root: typer.Typer) -> None:
    """Entry point ``balanceiq.cli``: mount ``bench``, ``demo``, ``testbed`` and ``cluster`` on the product CLI,
    and offer the sample fleet to the product features that need one (LiveEnv, ``record``)."""
    import os

    from balanceiq.testbed.fleet import ENV_VAR
    from balanceiq_lab.testbed.cli import testbed_app
    from balanceiq_lab.testbed.fleet import PROVIDER

    root.add_typer(bench_app, name="bench")
    root.command("demo")(demo)
    root.add_typer(testbed_app, name="testbed")
    root.add_typer(cluster_app, name="cluster")
    os.environ.setdefault(ENV_VAR, PROVIDER)  # inherited by the env runners and actors it starts
