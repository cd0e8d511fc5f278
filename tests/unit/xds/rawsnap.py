"""Snapshots of arbitrary, unvalidated bytes: what the xDS tests publish to make a client NACK."""

from __future__ import annotations

from collections.abc import Mapping

from balanceiq.xds.snapshot import EDS_TYPE, Resource, Snapshot


def raw_snapshot(version: str, resources: Mapping[str, bytes], type_url: str = EDS_TYPE) -> Snapshot:
    return Snapshot(version, {n: Resource.from_bytes(n, b, type_url) for n, b in resources.items()}, type_url)
