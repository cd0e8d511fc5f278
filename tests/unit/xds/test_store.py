"""The snapshot store: versions never repeat, watchers are isolated, state survives restarts."""

from __future__ import annotations

import json
import threading
import types
from pathlib import Path

import pytest

from balanceiq.xds import store as store_mod
from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.snapshot import Snapshot, build_snapshot
from balanceiq.xds.store import EPOCH_FILE, STATE_FILE, SnapshotStore


def assignment(cluster: str = "svc", w1: int = 1, w2: int = 2, health: str = "HEALTHY") -> Assignment:
    return Assignment(
        cluster,
        (
            EndpointAssignment(
                "10.0.0.1:80", "10.0.0.1", 80, w1, "aws", "us-east-1", "a", cost_per_million_requests=0.4
            ),
            EndpointAssignment("[::1]:81", "::1", 81, w2, "gcp", "us-central1", None, health, 0.35),  # type: ignore[arg-type]
        ),
    )


def fake_clock(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    fake = types.SimpleNamespace(time_ns=lambda: ms * 1_000_000, time=lambda: ms / 1000)
    monkeypatch.setattr(store_mod, "time", fake)


def no_temp_files(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# --- versions ----------------------------------------------------------------------------


def test_versions_are_epoch_dot_seq_and_increase() -> None:
    s = SnapshotStore()
    v = [s.next_version() for _ in range(3)]
    assert v == [f"{s.epoch}.1", f"{s.epoch}.2", f"{s.epoch}.3"]


def test_epoch_is_wall_clock_ms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_clock(monkeypatch, 5_000_000)
    assert SnapshotStore(tmp_path).epoch == 5_000_000
    assert (tmp_path / EPOCH_FILE).read_text().strip() == "5000000"


def test_epoch_increases_even_when_clock_goes_backwards(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_clock(monkeypatch, 2_000_000_000_000)
    first = SnapshotStore(tmp_path).epoch
    fake_clock(monkeypatch, 1_000)  # the clock stepped back by decades
    second = SnapshotStore(tmp_path).epoch
    third = SnapshotStore(tmp_path).epoch
    assert first < second < third
    assert second == first + 1 and third == first + 2


def test_epoch_increases_with_same_clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_clock(monkeypatch, 123_456)
    epochs = [SnapshotStore(tmp_path).epoch for _ in range(5)]
    assert epochs == sorted(set(epochs)) and len(epochs) == 5


def test_versions_never_repeat_across_restarts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: set[str] = set()
    for clock in [10_000, 10_000, 5, 10_000, 9_999]:  # restarts, some with the clock back
        fake_clock(monkeypatch, clock)
        s = SnapshotStore(tmp_path)
        for _ in range(3):
            v = s.publish_assignments([assignment()]).version
            assert v not in seen
            seen.add(v)
    assert len(seen) == 15


def test_unreadable_epoch_file_falls_back_to_clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / EPOCH_FILE).write_text("not a number")
    fake_clock(monkeypatch, 777)
    assert SnapshotStore(tmp_path).epoch == 777


def test_state_dir_created(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    s = SnapshotStore(d)
    assert int((d / EPOCH_FILE).read_text()) == s.epoch


def test_concurrent_next_version_unique() -> None:
    s = SnapshotStore()
    out: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [s.next_version() for _ in range(200)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(out) == len(set(out)) == 800


# --- publish and watch ---------------------------------------------------------------------


def test_latest_none_until_published() -> None:
    s = SnapshotStore()
    assert s.latest() is None
    snap = s.publish_assignments([assignment()])
    assert s.latest() is snap
    assert snap.assignments["svc"] == assignment()


def test_publish_notifies_watchers_and_unsubscribe_works() -> None:
    s = SnapshotStore()
    a_got: list[Snapshot] = []
    b_got: list[Snapshot] = []
    cancel_a = s.watch(a_got.append)
    s.watch(b_got.append)
    s1 = s.publish_assignments([assignment()])
    assert a_got == [s1] and b_got == [s1]
    cancel_a()
    cancel_a()  # idempotent
    s2 = build_snapshot(s.next_version(), [assignment(w1=5)])
    s.publish(s2)
    assert a_got == [s1]
    assert b_got == [s1, s2]
    assert s.latest() is s2


def test_raising_watcher_does_not_block_others(caplog: pytest.LogCaptureFixture) -> None:
    s = SnapshotStore()
    got: list[Snapshot] = []

    def broken(_: Snapshot) -> None:
        raise RuntimeError("boom")

    s.watch(broken)
    s.watch(got.append)
    snap = s.publish_assignments([assignment()])
    assert got == [snap]
    assert s.latest() is snap
    assert "snapshot watcher failed" in caplog.text


def test_watcher_may_unsubscribe_itself_during_publish() -> None:
    s = SnapshotStore()
    calls: list[str] = []
    cancel_holder: list = []

    def once(_: Snapshot) -> None:
        calls.append("once")
        cancel_holder[0]()

    cancel_holder.append(s.watch(once))
    s.watch(lambda _: calls.append("other"))
    s.publish_assignments([assignment()])
    s.publish_assignments([assignment(w1=3)])
    assert calls == ["once", "other", "other"]


# --- persistence -----------------------------------------------------------------------------


def test_persisted_assignments_restore(tmp_path: Path) -> None:
    s = SnapshotStore(tmp_path)
    assert s.restore() is None  # nothing persisted yet
    a = assignment(w1=17, w2=23, health="DRAINING")
    b = assignment("other", w1=4)
    snap = s.publish_assignments([a, b])
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["version"] == snap.version
    restored = SnapshotStore(tmp_path).restore()
    assert restored is not None
    assert {r.cluster: r for r in restored} == {"svc": a, "other": b}


def test_restore_latest_publish_wins(tmp_path: Path) -> None:
    s = SnapshotStore(tmp_path)
    s.publish_assignments([assignment(w1=1)])
    s.publish_assignments([assignment(w1=99)])
    restored = SnapshotStore(tmp_path).restore()
    assert restored is not None and restored[0].weights["10.0.0.1:80"] == 99


def test_no_state_dir_means_nothing_persisted() -> None:
    s = SnapshotStore()
    s.publish_assignments([assignment()])
    assert s.restore() is None


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[1, 2]",
        '"a string"',
        "{}",
        '{"assignments": 5}',
        '{"assignments": [5]}',
        '{"assignments": {"a": 1}}',
        '{"assignments": [{"cluster": "c"}]}',
        '{"assignments": [{"cluster": "c", "endpoints": [{"address": "h:1", "weight": 0, "cloud": "x", "region": "r"}]}]}',
        '{"assignments": [{"cluster": "c", "endpoints": [{"address": "bad", "weight": 1, "cloud": "x", "region": "r"}]}]}',
        '{"assignments": [{"cluster": "c", "endpoints": [{"address": "h:1", "weight": 1, "cloud": "x", "region": "r", "health": null}]}]}',
    ],
)
def test_corrupt_state_file_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert SnapshotStore(tmp_path).restore() is None


def test_binary_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe\x00garbage")
    assert SnapshotStore(tmp_path).restore() is None


def test_deeply_nested_state_file_is_ignored(tmp_path: Path) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting.
    (tmp_path / STATE_FILE).write_text("[" * 100_000)
    assert SnapshotStore(tmp_path).restore() is None


def test_restored_state_is_publishable_or_ignored(tmp_path: Path) -> None:
    """Whatever restore() returns must build: a non-string zone is corrupt, not usable."""
    (tmp_path / STATE_FILE).write_text(
        json.dumps(
            {
                "assignments": [
                    {
                        "cluster": "c",
                        "endpoints": [{"address": "h:1", "weight": 1, "cloud": "x", "region": "r", "zone": 5}],
                    }
                ]
            }
        )
    )
    s = SnapshotStore(tmp_path)
    restored = s.restore()
    if restored is not None:
        s.publish_assignments(restored)  # must not raise


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    s = SnapshotStore(tmp_path)
    for i in range(5):
        s.publish_assignments([assignment(w1=i + 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([EPOCH_FILE, STATE_FILE])
    assert no_temp_files(tmp_path) == []


def test_atomic_write_failure_cleans_up_and_keeps_old_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    store_mod._atomic_write(target, "old")

    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(store_mod.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store_mod._atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert no_temp_files(tmp_path) == []


def test_persist_failure_does_not_break_publish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = SnapshotStore(tmp_path)
    got: list[Snapshot] = []
    s.watch(got.append)

    def failing(path: Path, text: str) -> None:
        raise OSError("read-only fs")

    monkeypatch.setattr(store_mod, "_atomic_write", failing)
    snap = s.publish_assignments([assignment()])
    assert got == [snap] and s.latest() is snap
    assert "could not persist" in caplog.text


def test_concurrent_publish_assignments_latest_is_newest_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish_assignments takes a version, then builds, then publishes. If two threads
    interleave, the snapshot published last must still carry the highest version, or
    ``latest()`` (and the persisted state) go back to an older version."""
    s = SnapshotStore()
    real_build = store_mod.build_snapshot
    first_built = threading.Event()
    second_done = threading.Event()
    calls = []

    def slow_first_build(version: str, assignments: object) -> Snapshot:
        calls.append(version)
        if len(calls) == 1:
            first_built.set()
            second_done.wait(2)  # the first caller is descheduled after taking its version
        return real_build(version, assignments)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "build_snapshot", slow_first_build)
    t = threading.Thread(target=lambda: s.publish_assignments([assignment(w1=1)]))
    t.start()
    assert first_built.wait(2)
    s.publish_assignments([assignment(w1=2)])
    second_done.set()
    t.join(5)
    latest = s.latest()
    assert latest is not None
    seqs = sorted(int(v.split(".")[1]) for v in calls)
    assert int(latest.version.split(".")[1]) == seqs[-1]
