"""The local-Ray helper's clean-up, which CI depends on when a Ray start fails."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

from localray import _reap_half_started_node


class _WarnsWhenTouched:
    """Like torch.distributed.reduce_op: reading ``__class__`` warns."""

    def __getattribute__(self, name: str) -> object:
        warnings.warn("deprecated", FutureWarning, stacklevel=2)
        return object.__getattribute__(self, name)


def test_reaper_kills_a_left_over_ray_process_among_objects_that_warn(tmp_path: Path) -> None:
    fake = tmp_path / "ray" / "core" / "src" / "ray" / "raylet"
    fake.parent.mkdir(parents=True)
    fake.write_text("import time\ntime.sleep(60)\n")
    keep = [_WarnsWhenTouched() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, str(fake)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _reap_half_started_node()
        assert proc.returncode is not None, "the process under a /ray/ path was not reaped"
        assert other.poll() is None, "a process that is not Ray's was killed"
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()
    assert keep
