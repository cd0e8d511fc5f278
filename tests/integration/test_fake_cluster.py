"""`balanceiq train --address auto` on a real multi-node Ray cluster on this machine.

Ray's fake multi-node provider (cluster-local.yaml) starts real raylets as separate
nodes; RLlib places its env runners on them through the GCS, as it would on AWS. The
test starts such a cluster, trains on it, proves the env runners ran on different worker
nodes, and leaves nothing behind.

Other engineers run their own Ray on this machine at the same time, so this cluster is
kept apart from theirs:
- its own RAY_TMPDIR: sessions, sockets and the `ray_current_cluster` address file live
  there (`--address auto` finds this cluster through that file, not /tmp/ray's), and
  every process of the cluster inherits RAY_TMPDIR, which marks it as ours;
- free ports for the GCS, the dashboard, its agent and the Ray Client server (Ray's
  defaults, 6379/8265/52365/10001, may be taken by another engineer's `ray start`);
- no `ray stop`: it kills every Ray process on the machine, other users' included
  (it matches process names). Teardown does what `ray stop --force` does (SIGKILL, then
  removing the address file) to our processes only: those carrying our RAY_TMPDIR in
  their environment or command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from balanceiq.testbed.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUDGET_S = 270.0  # the whole test, teardown included, under pytest's 300 s
DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


class FakeCluster:
    """One fake multi-node cluster: started, inspected and killed by this test only."""

    def __init__(self, config: Path, deadline: float) -> None:
        # Short path: Unix socket paths under it (session dir/sockets/...) must stay < 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="biqfc-", dir="/tmp"))
        self.deadline = deadline
        self.gcs_port, self.dashboard_port, self.agent_port, self.client_port = free_ports(4)
        import ray._private.services

        self.gcs_address = f"{ray._private.services.get_node_ip_address()}:{self.gcs_port}"
        cfg = yaml.safe_load(config.read_text())
        # Fake workers join the GCS at provider.gcs_address (default: node IP on 6379).
        cfg["provider"]["gcs_address"] = self.gcs_address
        self.config = self.tmp / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # RAY_ADDRESS would override `auto`
        self.env.update(
            {
                "RAY_TMPDIR": str(self.tmp),
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop: launch workers quickly
                # Token auth stays on, explicitly: `ray start` refuses to start without a
                # token and the Ray CLI (state API) sends it; the token is ~/.ray/auth_token.
                "RAY_AUTH_MODE": "token",
            }
        )
        self.core_pids: dict[int, str] = {}  # every raylet / gcs_server of ours ever seen

    def remaining(self, cap: float) -> float:
        return max(1.0, min(cap, self.deadline - time.monotonic()))

    def run(self, *args: str, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=self.remaining(timeout)
        )

    def start(self) -> None:
        res = self.run(
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--num-cpus=0",
            f"--autoscaling-config={self.config}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={self.client_port}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            timeout=120,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        self.note_core_pids()

    def note_core_pids(self) -> None:
        self.core_pids |= {
            p.pid: p.info["name"] for p in self.processes() if p.info["name"] in ("gcs_server", "raylet")
        }

    def state(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        """`ray list KIND` through this cluster's dashboard (the state API)."""
        args = [
            str(BIN / "ray"),
            "list",
            kind,
            "--address",
            f"http://127.0.0.1:{self.dashboard_port}",
            "--format",
            "json",
            "--detail",
            "--limit",
            "1000",
        ]
        for f in filters:
            args += ["--filter", f]
        res = self.run(*args, timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    def wait_for_workers(self, n: int, timeout: float) -> list[dict[str, Any]]:
        end = time.monotonic() + self.remaining(timeout)
        workers: list[dict[str, Any]] = []
        while time.monotonic() < end:
            workers = [x for x in self.state("nodes", "state=ALIVE") if not x["is_head_node"]]
            if len(workers) >= n:
                return workers
            time.sleep(2)
        raise AssertionError(
            f"{len(workers)} of {n} fake worker nodes joined in {timeout:.0f} s\n{self.log_tail('monitor.err')}"
        )

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: RAY_TMPDIR inherited, or our dir on its command line."""
        marker, found = str(self.tmp), []
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            if p.pid == os.getpid():
                continue
            try:
                if marker in " ".join(p.info["cmdline"] or []) or p.environ().get("RAY_TMPDIR") == marker:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass
        return found

    def stop(self) -> None:
        """`ray stop --force` for this cluster only. The autoscaler (monitor) goes first
        so it cannot relaunch a worker node while they die; the scan repeats until
        nothing of ours is left (bounded)."""
        self.note_core_pids()
        end = time.monotonic() + 30
        while (procs := self.processes()) and time.monotonic() < end:
            procs.sort(key=lambda p: "monitor.py" not in " ".join(p.info["cmdline"] or []))
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=5)
        # `ray stop` then removes the address file; ours is in our RAY_TMPDIR.
        (self.tmp / "ray" / "ray_current_cluster").unlink(missing_ok=True)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        logs = sorted((self.tmp / "ray").glob(f"session_*/logs/{name}"))
        return f"--- {name}\n" + (logs[-1].read_text(errors="replace")[-chars:] if logs else "(none)")

    def remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _address_file_state() -> str | None:
    try:
        return DEFAULT_ADDRESS_FILE.read_text()
    except OSError:
        return None


def test_train_runs_env_runners_on_several_fake_nodes_and_leaves_nothing(tmp_path: Path) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    default_address_before = _address_file_state()
    # Token auth is on: make sure the token exists (a no-op if it does; what a first
    # local `ray.init()` would do). It prints the token, which goes nowhere.
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )

    cluster = FakeCluster(ROOT / "cluster-local.yaml", deadline=t0 + BUDGET_S)
    try:
        cluster.start()
        timings["head_started_s"] = time.monotonic() - t0
        assert {"gcs_server", "raylet"} <= set(cluster.core_pids.values()), cluster.core_pids
        assert (cluster.tmp / "ray" / "ray_current_cluster").read_text().strip() == cluster.gcs_address

        workers = cluster.wait_for_workers(2, timeout=120)
        timings["workers_joined_s"] = time.monotonic() - t0
        worker_ids = {w["node_id"] for w in workers}
        head_id = next(x["node_id"] for x in cluster.state("nodes") if x["is_head_node"])

        ckpt = tmp_path / "ckpt"
        res = cluster.run(
            str(BIN / "balanceiq"),
            "train",
            "--address",
            "auto",
            "--env",
            "sim",
            "--scenario",
            "degrade",
            "--iterations",
            "2",
            "--num-env-runners",
            "2",
            "--checkpoint-dir",
            str(ckpt),
            timeout=200,
        )
        timings["trained_s"] = time.monotonic() - t0
        assert res.returncode == 0, res.stderr[-4000:]
        # The driver joined this cluster (found through our RAY_TMPDIR), not another one.
        assert f"Connecting to existing Ray cluster at address: {cluster.gcs_address}" in res.stderr
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert summary["module_class"] == "CriticalEndpointModule"
        assert summary["iterations"] == 2 and summary["env_steps"] > 0
        assert (ckpt / "training_summary.json").exists()

        # Where did the env runners run? The GCS keeps finished actors with their node.
        runners = cluster.state("actors", "class_name=SingleAgentEnvRunner")
        nodes = {a["node_id"] for a in runners}
        print(f"env runners on nodes {sorted(n[-5:] for n in nodes)} (head {head_id[-5:]}); timings {timings}")
        assert len(runners) == 2, runners
        assert len(nodes) == 2, f"both env runners ran on one node: {nodes}"
        # The head has 0 CPUs: they ran on the fake worker nodes, one each.
        assert nodes <= worker_ids and head_id not in nodes
    finally:
        cluster.stop()
        timings["stopped_s"] = time.monotonic() - t0
        left = cluster.processes()
        core_alive = {pid: name for pid, name in cluster.core_pids.items() if psutil.pid_exists(pid)}
        cluster.remove()
    print(f"timings {timings}")
    assert not left, f"processes left behind: {[(p.pid, p.info['name']) for p in left]}"
    # 1 gcs_server + 3 raylets (head, 2 workers) at least were ours, and are gone.
    assert sorted(cluster.core_pids.values()).count("raylet") >= 3, cluster.core_pids
    assert not core_alive, f"raylet/gcs_server still running: {core_alive}"
    assert not (cluster.tmp / "ray" / "ray_current_cluster").exists()
    # /tmp/ray/ray_current_cluster (what plain `ray.init("auto")` reads) was never ours.
    after = _address_file_state()
    assert after == default_address_before or (after is not None and cluster.gcs_address not in after)
    assert timings["stopped_s"] < 300
