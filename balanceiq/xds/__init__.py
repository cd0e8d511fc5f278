"""xDS: the weight store (snapshots, versions, persistence) and the gRPC servicers.

Layers, one way: ``assignment`` (validated weights) -> ``snapshot`` (encoded once) ->
``store`` (versioned, persisted, watched) -> ``protocol`` (per-stream rules) ->
``server`` (gRPC) -> ``actor`` (Ray).
"""

from balanceiq.xds.assignment import Assignment, EndpointAssignment
from balanceiq.xds.snapshot import EDS_TYPE, Snapshot, build_snapshot
from balanceiq.xds.store import SnapshotStore

__all__ = ["EDS_TYPE", "Assignment", "EndpointAssignment", "Snapshot", "SnapshotStore", "build_snapshot"]
