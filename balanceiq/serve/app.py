"""The Ray Serve application (config from ``BALANCEIQ_CONFIG``): the Policy deployment, and the
Controller (FastAPI ingress): it gets or starts the xDS actor, runs one control loop per cluster and
serves the API. The lease keeps a second loop (while Serve replaces the replica) from pushing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from balanceiq.config import Settings, load_config
from balanceiq.serve.api import create_api
from balanceiq.serve.plane import ControlPlane, PolicyClient, cluster_controllers, load_or_create_token
from balanceiq.serve.policy import PolicyDeployment, PolicyModel
from balanceiq.serve.server import ApiServer
from balanceiq.serve.training import TrainingManager
from balanceiq.telemetry.observe import Telemetry
from balanceiq.xds.actor import start_actor
from balanceiq.xds.client import ActorXdsClient


@serve.deployment(
    name="Controller",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=512,
    health_check_period_s=5,
)
@serve.ingress()
class ControllerDeployment:
    def __init__(
        self,
        settings: dict[str, Any],
        policy: DeploymentHandle,
        recording: str | None = None,
        checkpoint: str | None = None,
    ) -> None:
        self.settings = Settings.model_validate(settings)
        token, token_file, created = load_or_create_token(self.settings)
        if created:
            # The path, not the token: worker output ends up in Ray's log files.
            print(
                f"BalanceIQ API token generated: stored in {token_file} (mode 0600). "
                f'Use: curl -H "Authorization: Bearer $(cat {token_file})" ...',
                flush=True,
            )
        xds = ActorXdsClient(start_actor(self.settings))
        # The loop scores here (no Serve handle call per decision), with the checkpoint the
        # Policy deployment serves: PolicyClient.reload swaps both.
        local = PolicyModel(checkpoint)
        # One intra-op thread: a tiny forward pass gains nothing from more.
        import torch

        torch.set_num_threads(1)
        self.telemetry = {c.name: Telemetry(self.settings, c.name) for c in self.settings.clusters}
        observe = self.telemetry.__getitem__
        controllers = cluster_controllers(
            self.settings, xds, lambda rows: local.score_many([rows])[0], observe, recording=recording
        )
        policy_client = PolicyClient(
            info=lambda: policy.info.remote().result(timeout_s=2.0),
            reload=lambda ckpt: policy.reload.remote(ckpt).result(timeout_s=120.0),
            local=local,
        )
        training = TrainingManager(
            Path(self.settings.state_dir) / "checkpoints",
            serving=lambda: policy_client.info()["checkpoint"],
            promote=policy_client.reload,
        )
        self.plane = ControlPlane(self.settings, controllers, policy=policy_client, training=training, token=token)
        # API callers score through the Policy deployment (batched), not the loop's copy.
        self.plane.api_scorer = lambda rows: policy.score.remote(rows).result(timeout_s=2.0)
        self.server: ApiServer | None = None
        if self.settings.api.serve_directly:
            self.server = ApiServer(create_api(self.plane), self.settings.api.host, self.settings.api.port).start()
            self.plane.api_server = lambda: self.server.state if self.server is not None else "off"
        self.plane.start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.plane)

    def check_health(self) -> None:
        # A dead loop is a broken controller: let Serve replace the replica.
        for name, loop in self.plane.loops.items():
            if loop.steps and not loop.running:
                raise RuntimeError(f"control loop of cluster {name} stopped")

    def __del__(self) -> None:
        try:
            if self.server is not None:
                self.server.stop()
            self.plane.stop()
            for t in self.telemetry.values():
                t.close()
        except Exception:  # interpreter shutdown: best effort
            pass


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Application builder; ``args`` may name ``config`` (a path) or ``settings``, ``checkpoint`` and ``recording``."""
    args = dict(args or {})
    if isinstance(args.get("settings"), Settings):
        settings = args["settings"]
    else:
        config = Path(args.get("config") or os.environ.get("BALANCEIQ_CONFIG", "balanceiq.yaml")).resolve()
        settings = load_config(config)
    checkpoint = args.get("checkpoint") or (str(settings.api.checkpoint) if settings.api.checkpoint else None)
    recording = args.get("recording")
    # mypy does not apply class decorators: @serve.deployment made these Deployments (with .bind).
    policy = PolicyDeployment.bind(checkpoint, settings.api.policy_niceness)  # type: ignore[attr-defined]
    return ControllerDeployment.bind(  # type: ignore[attr-defined]
        settings.model_dump(mode="json"), policy, recording, checkpoint=checkpoint
    )
