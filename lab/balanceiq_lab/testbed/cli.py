"""``balanceiq testbed up|down``: the detached sample testbed, mounted by the lab's entry point."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from balanceiq.cli import ConfigOpt, _settings, err, out

testbed_app = typer.Typer(help="The local testbed: sample backends, Envoy, the xDS actor.", no_args_is_help=True)


@testbed_app.command("up")
def testbed_up(
    config: ConfigOpt = None,
    foreground: Annotated[bool, typer.Option("--foreground", "-f", help="Stay attached; Ctrl-C tears down.")] = False,
) -> None:
    """Start Ray (if needed), the xDS actor, the sample backends and Envoy; print URLs."""
    from balanceiq_lab.testbed import lifecycle

    settings = _settings(config)
    urls = lifecycle.up(settings, console=err)
    out.print_json(json.dumps(urls))
    if foreground:
        lifecycle.wait_for_interrupt(settings, console=err)


@testbed_app.command("down")
def testbed_down(config: ConfigOpt = None) -> None:
    """Stop everything `testbed up` started (by pid), and the xDS actor."""
    from balanceiq_lab.testbed import lifecycle

    for line in lifecycle.down(_settings(config)):
        err.print(f"stopped {line}")
