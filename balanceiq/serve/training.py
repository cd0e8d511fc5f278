"""Training runs started from the API, on the Ray cluster: train → evaluate → promote. A
:class:`TrainingRun` actor trains, then runs the new and the serving checkpoint on every shipped
scenario; the manager hot-swaps the Policy deployment only if ``promotion_decision`` says the new
one is better. One run at a time: two runs racing to promote is a bug."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import ray

from balanceiq.exceptions import BalanceIQError, ControlError
from balanceiq.sim.scenario import load_scenario


def iso_time(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def training_metrics(runs: list[dict[str, Any]], last_update: float | None) -> dict[str, Any]:
    """The original service's training fields, from ``runs`` (newest first)."""
    hist = runs[0]["history"] if runs else []
    rewards = [h["episode_return_mean"] for h in hist if h.get("episode_return_mean") is not None]
    losses = [h["total_loss"] for h in hist if h.get("total_loss") is not None]
    steps = hist[-1].get("env_steps") if hist else None
    return {
        "training_iterations": sum(r["iteration"] for r in runs),
        "buffer_size": int(steps) if steps else 0,  # env steps sampled: PPO has no replay buffer
        "current_reward": rewards[-1] if rewards else None,
        "model_accuracy": None,  # a policy has no accuracy; kept for compatibility
        "recent_rewards": rewards[-20:],
        "recent_losses": losses[-20:],
        "last_update": iso_time(last_update),
        "runs": [{k: v for k, v in r.items() if k not in ("history", "params", "summary")} for r in runs],
    }


class TrainingRun:
    """Ray actor body (``max_concurrency=2``: ``progress`` runs beside ``run``)."""

    def __init__(self, run_id: str, params: dict[str, Any]) -> None:
        self.run_id = run_id
        self.params = params
        self._lock = threading.Lock()
        self.state = "pending"
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.message = ""
        self.stages: dict[str, dict[str, Any]] = {"train": {"state": "pending"}}
        self.promote = False

    def _on_iteration(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.history.append({**row, "at": time.time()})

    def _stage(self, name: str, state: str, **info: Any) -> None:
        with self._lock:
            self.stages[name] = {"state": state, **info, "at": time.time()}

    def _fail(self, stage: str, what: str, exc: Exception) -> None:
        self._stage(stage, "failed", error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.state, self.message = "failed", f"{what} failed: {type(exc).__name__}: {exc}"

    def run(self) -> dict[str, Any]:
        from rich.console import Console

        from balanceiq.sim.evaluate import evaluate_checkpoints, merge_evaluations, promotion_decision
        from balanceiq.train import train

        with self._lock:
            self.state = "running"
        self._stage("train", "running")
        try:
            summary = train(
                scenarios=self.params.get("scenarios"),
                iterations=int(self.params["iterations"]),
                checkpoint_dir=Path(self.params["checkpoint_dir"]),
                num_env_runners=self.params.get("num_env_runners"),
                seed=int(self.params.get("seed", 0)),
                console=Console(stderr=True, quiet=True),
                on_iteration=self._on_iteration,
            )
        except Exception as exc:  # reported through progress(), not lost in a log
            self._fail("train", "training", exc)
            return self.progress()
        self._stage("train", "done", checkpoint=summary["checkpoint"], final_return=summary["final_return"])
        with self._lock:
            self.summary = {k: v for k, v in summary.items() if k != "history"}
        if self.params.get("evaluate", True):
            self._stage("evaluate", "running")
            try:
                ev = evaluate_checkpoints(
                    summary["checkpoint"],
                    self.params.get("serving_checkpoint"),
                    seeds=tuple(range(int(self.params.get("eval_seeds", 1)))),
                )
                ok, why = promotion_decision(ev)
            except Exception as exc:
                self._fail("evaluate", "evaluation", exc)
                return self.progress()
            if self.params.get("live_eval") is not None:
                live = self._evaluate_live(summary["checkpoint"])
                if live is None:
                    return self.progress()
                ev = merge_evaluations(ev, live)
                ok, why = promotion_decision(ev)
            self._stage("evaluate", "done", **{k: ev[k] for k in ("candidate", "serving", "scenarios")}, verdict=why)
            with self._lock:
                self.promote = ok and bool(self.params.get("promote", True))
        with self._lock:
            self.state = "done"
            self.message = self.stages.get("evaluate", {}).get("verdict") or f"checkpoint at {summary['checkpoint']}"
        return self.progress()

    def _evaluate_live(self, checkpoint: str) -> dict[str, Any] | None:
        """Both checkpoints on a private live testbed; ``None`` (run failed) on error."""
        from balanceiq.testbed.evaluate_live import evaluate_checkpoints_live

        self._stage("evaluate_live", "running", episodes_done=0)
        done: list[dict[str, Any]] = []

        def on_episode(row: dict[str, Any]) -> None:
            done.append(row)
            self._stage("evaluate_live", "running", episodes_done=len(done), last=row)

        try:
            live = evaluate_checkpoints_live(
                checkpoint,
                self.params.get("serving_checkpoint"),
                self.params["live_eval"],
                episodes=int(self.params.get("live_episodes", 2)),
                on_episode=on_episode,
            )
        except Exception as exc:
            self._fail("evaluate_live", "live evaluation", exc)
            return None
        self._stage("evaluate_live", "done", **{k: live[k] for k in ("candidate", "serving", "episodes", "seconds")})
        return live

    def progress(self) -> dict[str, Any]:
        with self._lock:
            last = self.history[-1] if self.history else {}
            return {
                "id": self.run_id,
                "state": self.state,
                "iteration": last.get("iteration", 0),
                "iterations": int(self.params["iterations"]),
                "reward": last.get("episode_return_mean"),
                "message": self.message,
                "history": list(self.history),
                "summary": self.summary,
                "params": dict(self.params),
                "stages": {k: dict(v) for k, v in self.stages.items()},
                "promote": self.promote,
                "checkpoint": self.params["checkpoint_dir"],
            }


class TrainingManager:
    """Starts runs and remembers their progress (the last one's kept after it ends)."""

    def __init__(self, checkpoint_root: Path, *, serving: Any = None, promote: Any = None) -> None:
        """``serving()`` names the checkpoint in service; ``promote(path)`` hot-swaps to one."""
        self.checkpoint_root = Path(checkpoint_root)
        self.serving = serving
        self.promote_fn = promote
        self._lock = threading.Lock()
        self._actors: dict[str, Any] = {}
        self._last: dict[str, dict[str, Any]] = {}  # by run id, oldest first
        self._last_update: float | None = None

    def start(
        self,
        iterations: int,
        scenarios: list[str] | None,
        num_env_runners: int,
        seed: int = 0,
        *,
        evaluate: bool = True,
        promote: bool = True,
        eval_seeds: int = 1,
        live_eval: dict[str, Any] | None = None,
        live_episodes: int = 2,
    ) -> dict[str, Any]:
        """``live_eval`` (keys over ``DEFAULT_LIVE_EVAL``; ``{}``: the defaults) adds a live evaluation."""
        with self._lock:
            for rid, run in self._last.items():
                if run["state"] in ("pending", "running"):
                    raise ControlError(f"training run {rid} is still {run['state']}; one run at a time")
            rid = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
            for sc in scenarios or []:
                try:
                    load_scenario(sc)
                except BalanceIQError as exc:
                    raise ControlError(f"scenario {sc!r}: {exc}") from exc
            if live_eval is not None:
                from balanceiq.testbed.evaluate_live import live_eval_config

                if not evaluate:
                    raise ControlError("live_eval needs evaluate: true (it is part of the evaluation)")
                if live_episodes < 1:
                    raise ControlError(f"live_episodes must be >= 1, got {live_episodes}")
                try:
                    live_eval = live_eval_config(live_eval)
                except BalanceIQError as exc:
                    raise ControlError(f"live_eval: {exc}") from exc
            serving = None
            if self.serving is not None:
                try:
                    serving = self.serving()
                except Exception as exc:  # no serving policy to compare with: no promotion either
                    raise ControlError(f"cannot tell which checkpoint is serving: {exc}") from exc
            params = {
                "iterations": iterations,
                "scenarios": scenarios,
                "num_env_runners": num_env_runners,
                "seed": seed,
                "checkpoint_dir": str((self.checkpoint_root / rid).resolve()),
                "evaluate": evaluate,
                "promote": promote and evaluate,
                "eval_seeds": eval_seeds,
                "serving_checkpoint": serving,
                "live_eval": live_eval,
                "live_episodes": live_episodes,
            }
            created = (
                ray.remote(TrainingRun)
                .options(name=f"training-{rid}", namespace="balanceiq", num_cpus=0, max_concurrency=2)
                .remote(rid, params)
            )
            # Ray types ActorClass.remote() as ActorHandle[T] | type[T]; what it returns is the handle.
            actor = cast(ray.actor.ActorHandle, created)
            actor.run.remote()
            self._actors[rid] = actor
            self._last[rid] = TrainingRun(rid, params).progress()  # what the actor reports until it starts
            self._last_update = time.time()
            return dict(self._last[rid])

    def refresh(self, timeout_s: float = 1.0) -> None:
        """Poll live runs; a finished or dead run's actor is released."""
        for rid, actor in list(self._actors.items()):
            try:
                p = ray.get(actor.progress.remote(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayError as exc:
                p = {**self._last[rid], "state": "failed", "message": f"training actor died: {type(exc).__name__}"}
            if p["state"] == "done" and p.get("promote") and self.promote_fn is not None:
                p["stages"]["promote"] = self._promote(p["checkpoint"])
                if p["stages"]["promote"]["state"] == "failed":
                    p["message"] = f"promotion failed: {p['stages']['promote']['error']}"
            elif p["state"] == "done" and "evaluate" in p["stages"]:
                p["stages"]["promote"] = {"state": "skipped", "reason": p["stages"]["evaluate"].get("verdict", "")}
            with self._lock:
                if p != self._last.get(rid):
                    self._last_update = time.time()
                self._last[rid] = p
                if p["state"] in ("done", "failed"):
                    ray.kill(actor)
                    self._actors.pop(rid, None)

    def _promote(self, checkpoint: str) -> dict[str, Any]:
        try:
            info = self.promote_fn(checkpoint)
        except Exception as exc:  # the old checkpoint keeps serving
            return {"state": "failed", "error": f"{type(exc).__name__}: {exc}", "at": time.time()}
        return {"state": "done", "checkpoint": checkpoint, "swaps": (info or {}).get("swaps"), "at": time.time()}

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(run) for run in reversed(self._last.values())]

    def metrics(self) -> dict[str, Any]:
        return training_metrics(self.runs(), self._last_update)

    def shutdown(self) -> None:
        for actor in list(self._actors.values()):
            try:
                ray.kill(actor)
            except ray.exceptions.RayError:
                pass
        self._actors.clear()
