"""Loading a trained policy, and using it with the same interface as the baselines."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from balanceiq.exceptions import PolicyError
from balanceiq.policy.baselines import Decision, PolicyContext
from balanceiq.policy.decide import decide, observe_only
from balanceiq.policy.features import encode
from balanceiq.policy.knobs import Knobs
from balanceiq.policy.memory import CoreState
from balanceiq.telemetry.observation import Observation

MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"
SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "cfr_rl"


def load_module(checkpoint: Path | str) -> Any:
    """The trained RLModule from an algorithm or module checkpoint directory (checked to be ours)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from balanceiq.policy.module import CriticalEndpointModule

    try:
        path = Path(checkpoint).resolve()  # RLlib reads through pyarrow, which wants a URI or absolute path
        exists = path.exists()
    except (OSError, ValueError) as exc:  # e.g. an embedded NUL byte sent over the API
        raise PolicyError(f"not a usable checkpoint path {str(checkpoint)!r}: {exc}") from exc
    if not exists:
        raise PolicyError(f"no checkpoint at {checkpoint}")
    if (path / MODULE_SUBDIR).exists():
        path = path / MODULE_SUBDIR
    try:
        module = RLModule.from_checkpoint(path)
    except Exception as exc:  # RLlib raises many kinds; the user needs one message
        raise PolicyError(f"cannot load a policy from {checkpoint}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, CriticalEndpointModule):
        raise PolicyError(
            f"{checkpoint} loaded as {type(module).__name__}, not CriticalEndpointModule "
            "(RLlib falls back to a default module when it cannot import ours)"
        )
    module.eval()
    return module


def scores(module: Any, rows: np.ndarray) -> np.ndarray:
    """Per-endpoint scores for one encoded observation ``[N, F]`` (any N)."""
    import torch
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        out = module._forward({Columns.OBS: torch.from_numpy(rows[None])})
    return np.asarray(out[Columns.ACTION_DIST_INPUTS][0].numpy())


def gumbel_perturb(s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores plus Gumbel noise: their top K is an exact Plackett-Luce draw (Gumbel-top-k)."""
    u = rng.uniform(1e-12, 1.0 - 1e-7, size=len(s))
    return s - np.log(-np.log(u))


@dataclass(eq=False)
class RLPolicy:
    """The trained CFR-RL policy: top-K scored endpoints are critical, the LP splits them."""

    name = "cfr_rl"
    module: Any
    _: KW_ONLY
    knobs_base: Knobs = field(default_factory=Knobs)  # the LP's weights; k comes from each context
    slo_ms: float = 150.0
    mode: str = "greedy"
    seed: int = 0
    force_breaching: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("sample", "greedy"):
            raise PolicyError(f"mode must be 'sample' or 'greedy', got {self.mode!r}")
        self.reset()

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str = SHIPPED, **kwargs: Any) -> RLPolicy:
        return cls(load_module(checkpoint), **kwargs)

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.state = CoreState()

    def knobs(self, ctx: PolicyContext) -> Knobs:
        return replace(self.knobs_base, k=int(ctx.k), slo_ms=self.slo_ms, force_breaching=self.force_breaching)

    def _perturbed(self, s: np.ndarray) -> np.ndarray:
        return gumbel_perturb(s, self._rng) if self.mode == "sample" else s

    def scores(self, obs: Observation, ctx: PolicyContext) -> np.ndarray:
        """The policy's score per endpoint on the core's capacity estimate (Gumbel-perturbed in ``sample`` mode)."""
        n = len(obs.endpoints)
        est, _ = observe_only(obs, ctx, self.knobs(ctx), self.state)
        return self._perturbed(scores(self.module, encode(obs, est.capacity, n, self.slo_ms))[:n])

    def critical_from_rows(self, rows: np.ndarray, n: int, k: int) -> list[int]:
        """The policy's own K for rows already encoded by an env (padding past ``n`` is never
        picked); no breachers added, the env adds them."""
        s = self._perturbed(scores(self.module, np.asarray(rows, dtype=np.float32))[:n])
        return [int(i) for i in np.argsort(-s, kind="stable")[: max(1, min(k, n))]]

    def decide(self, obs: Observation, ctx: PolicyContext) -> Decision:
        """The decision core with this policy's scores (it remembers across calls until :meth:`reset`)."""
        core = decide(obs, ctx, self.scores(obs, ctx), self.knobs(ctx), self.state)
        self.state = core.state
        return Decision(core.shares, core.weights, core.critical, core.info())
