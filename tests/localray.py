"""A local Ray for tests: started with a retry, and what a failed start left running reaped.

Its own module, not conftest.py: test packages have conftests of their own, so
``import conftest`` is ambiguous.
"""

from __future__ import annotations

import time


def _reap_half_started_node() -> None:
    """Kill and wait for the processes a failed ``ray.init`` left running.

    ``ray.shutdown`` does not know a node whose start raised, so its GCS or raylet kept
    running; their ``Popen`` objects, once collected, warned "subprocess ... is still
    running" in the next test's setup (CI: an error at setup of the fault suite)."""
    import gc
    import subprocess
    import warnings

    # type(), not isinstance(): isinstance falls back to obj.__class__, and some objects
    # in the heap warn when touched (torch.distributed.reduce_op: a FutureWarning, an
    # error under -W error, which turned this clean-up into the setup error itself).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        running = [
            obj
            for obj in gc.get_objects()
            if issubclass(type(obj), subprocess.Popen) and obj.returncode is None and "/ray/" in str(obj.args)
        ]
        for proc in running:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def init_local_ray(namespace: str) -> None:
    """``ray.init`` of a new local cluster (2 CPUs), tried twice.

    address="local": a new cluster even if `ray start` left one running on this machine.
    On a loaded 2-core box a node's start can time out once (seen in CI right after the
    fault suite's stacks stopped: the raylet "timed out during startup", or the GCS's
    port file never came); the half-started node's processes are killed and waited for,
    and the node is started again."""
    import ray

    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=namespace)
            return
        except Exception as exc:
            ray.shutdown()
            retry = attempt == 1 and "timed out" in str(exc).lower()
            del exc
            _reap_half_started_node()
            if not retry:
                raise
            time.sleep(5.0)
