"""A Ray head that can crash and come back: Redis as Ray's external GCS storage.

:class:`RedisProcess` runs the Debian ``redis-server`` on loopback with a password and a
private directory. :class:`RayHead` runs ``ray start --head`` as its own processes (not
the caller's driver), on ports of its own and a temp dir of its own, so it can be killed
like a machine that died (every process of that session, SIGKILL) and started again
with the same command. With ``redis`` set the GCS keeps its tables there, so detached
actors (the xDS server, Serve's controller) and Serve's applications come back on the
new head without an operator command; without it the new head starts empty.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from balanceiq.exceptions import TestbedError
from balanceiq.testbed.ports import free_ports


class RedisProcess:
    """``redis-server`` on 127.0.0.1 with a password; in memory only (no snapshots)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_ports(1)[0]
        self.password = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TestbedError(
                "redis-server is not installed: run `bash scripts/ensure-redis.sh` (Debian's redis-server)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The password on stdin's config, not argv: any local user can read argv.
        conf = self.workdir / "redis.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\nrequirepass {self.password}\n"
            f'dir {self.workdir}\nsave ""\nappendonly no\n'
        )
        conf.chmod(0o600)
        with (self.workdir / "redis.log").open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([exe, str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestbedError(
                    f"redis-server exited with {self.proc.returncode}: {(self.workdir / 'redis.log').read_text()[-500:]}"
                )
            if "Ready to accept connections" in (self.workdir / "redis.log").read_text(errors="replace"):
                return self
            time.sleep(0.05)
        self.stop()
        raise TestbedError(f"redis-server did not get ready within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class RayHead:
    """One Ray head node started with ``ray start --head``, killable and restartable."""

    def __init__(
        self,
        workdir: Path,
        *,
        redis: RedisProcess | None = None,
        namespace: str = "balanceiq",
        num_cpus: int = 2,
        ray_bin: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        # Ray puts a socket path under the temp dir: keep it short (108-byte limit).
        self.temp_dir = Path(f"/tmp/biq-ray-{secrets.token_hex(4)}")
        self.redis = redis
        self.namespace = namespace
        self.num_cpus = num_cpus
        # Beside this interpreter (the venv's), else on PATH.
        self.ray_bin = ray_bin or str(Path(sys.executable).parent / "ray")
        if not Path(self.ray_bin).exists():
            found = shutil.which("ray")
            if found is None:
                raise TestbedError("the `ray` command is not on PATH")
            self.ray_bin = found
        # Every port Ray would otherwise take from fixed defaults, free now, the same on
        # every start (a restarted head is the same node to its clients).
        (
            self.port,
            self.node_manager_port,
            self.object_manager_port,
            self.agent_port,
            self.agent_grpc_port,
            self.metrics_port,
            self.runtime_env_port,
            self.client_port,
        ) = free_ports(8)
        self.starts = 0
        # Every process `ray start` spawns inherits this: how kill() finds them all, even
        # a worker that renamed itself (ray::...) or lost its parent.
        self.marker = f"biq-{secrets.token_hex(8)}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Token auth stays on, explicitly (the token is ~/.ray/auth_token; README "Ray").
        env["RAY_AUTH_MODE"] = "token"
        env["BALANCEIQ_RAY_HEAD"] = self.marker
        if self.redis is not None:
            env["RAY_REDIS_ADDRESS"] = self.redis.address
            env["RAY_external_storage_namespace"] = self.namespace
        return env

    def start(self, timeout: float = 120.0) -> float:
        """``ray start --head``; seconds it took."""
        args = [
            self.ray_bin,
            "start",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
            f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--ray-client-server-port={self.client_port}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        if self.redis is not None:
            args.append(f"--redis-password={self.redis.password}")
        if self.starts == 0:
            # `ray start` refuses to start without the token; make sure it exists (a no-op
            # if it does: what a first local `ray.init()` would do). It prints the token.
            subprocess.run(
                [self.ray_bin, "get-auth-token", "--generate"],
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
        t0 = time.monotonic()
        res = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise TestbedError(f"ray start --head failed ({res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
        self.starts += 1
        return time.monotonic() - t0

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: whatever carries its marker in the environment, or
        its temp dir on the command line, and everything those started."""
        me = os.getpid()
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid == me:
                continue
            try:
                if (
                    any(str(self.temp_dir) in part for part in p.info["cmdline"] or ())
                    or p.environ().get("BALANCEIQ_RAY_HEAD") == self.marker
                ):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        seen = {p.pid: p for p in roots}
        for p in roots:
            try:
                seen.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(seen.values())

    def kill(self, timeout: float = 15.0) -> int:
        """SIGKILL every process of this head, as a machine that died; how many. Looks
        again until none is left: the raylet may start a worker while it is being killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            procs = self.processes()
            if not procs:
                return len(killed)
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
                killed.add(p.pid)
            _, alive = psutil.wait_procs(procs, timeout=max(0.1, deadline - time.monotonic()))
            if alive and time.monotonic() >= deadline:
                raise TestbedError(f"{len(alive)} Ray process(es) survived SIGKILL: {[p.pid for p in alive]}")
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
