"""The Policy deployment: the RLModule checkpoint behind a batched ``score`` call. :class:`PolicyModel`
hot-swaps off the event loop while the old checkpoint answers; one that fails to load leaves it serving."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from balanceiq.exceptions import PolicyError
from balanceiq.policy.checkpoint import SHIPPED, load_module
from balanceiq.policy.features import N_FEATURES
from balanceiq.policy.inference import NumpyScorer, export


class PolicyModel:
    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self.checkpoint = Path(checkpoint or SHIPPED)
        self.module = load_module(self.checkpoint)
        self.fast: NumpyScorer | None = export(self.module, N_FEATURES)
        self.loaded_at = time.time()
        self.swaps = 0
        self.scored = 0
        self.max_batch = 0  # largest batch seen: evidence that @serve.batch is batching

    def score_many(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        """Scores for each ``[N, F]`` array; arrays of the same N share a forward pass."""
        import torch
        from ray.rllib.core.columns import Columns

        with self._lock:  # a swap during this batch must not mix two modules
            module, fast = self.module, self.fast
        arrays = [np.asarray(rows, dtype=np.float32) for rows in batch]
        groups: dict[int, list[int]] = {}
        for i, rows in enumerate(arrays):
            if rows.ndim != 2 or rows.shape[1] != N_FEATURES or rows.shape[0] < 1:
                raise PolicyError(f"expected rows of shape [N>=1, {N_FEATURES}], got {list(rows.shape)}")
            if not np.all(np.isfinite(rows)):
                raise PolicyError("rows contain NaN or Inf")
            groups.setdefault(rows.shape[0], []).append(i)
        out: dict[int, np.ndarray] = {}
        with torch.no_grad():
            for idx in groups.values():
                stacked = np.stack([arrays[i] for i in idx])
                if fast is not None:
                    logits = fast(stacked)
                else:
                    obs = {Columns.OBS: torch.from_numpy(stacked)}
                    logits = module._forward(obs)[Columns.ACTION_DIST_INPUTS].numpy()
                out.update(zip(idx, logits))
        self.scored += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        return [out[i] for i in range(len(batch))]

    def reload(self, checkpoint: str | Path) -> dict[str, Any]:
        module = load_module(checkpoint)  # raises PolicyError and keeps the old one
        fast = export(module, N_FEATURES)
        with self._lock:
            self.module, self.fast = module, fast
            self.checkpoint = Path(checkpoint)
            self.loaded_at = time.time()
            self.swaps += 1
        return self.info()

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "module_class": type(self.module).__name__,
            "forward": "numpy" if self.fast is not None else "torch",
            "parameters": sum(int(p.numel()) for p in self.module.parameters()),
            "loaded_at": self.loaded_at,
            "swaps": self.swaps,
            "scored": self.scored,
            "max_batch": self.max_batch,
        }


@serve.deployment(
    name="Policy",
    num_replicas=1,
    # Inference is a few small matmuls; reserving a core would starve training on 2 CPUs.
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
)
class PolicyDeployment:
    def __init__(self, checkpoint: str | None = None, niceness: int = 0) -> None:
        # Batch scoring is throughput work, the control loop latency work: a lower CPU
        # priority keeps a flood of score calls from delaying decisions.
        if niceness > 0:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), niceness))
        self.model = PolicyModel(checkpoint)

    # No wait: a lone caller is not delayed, and concurrent callers still share a batch.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def score(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return self.model.score_many(list(batch))

    async def reload(self, checkpoint: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.model.reload, checkpoint)

    def info(self) -> dict[str, Any]:
        return self.model.info()
