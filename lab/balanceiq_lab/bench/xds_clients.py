"""Simulated xDS clients for the benchmark: real gRPC streams that ACK like Envoy does.

Each client process opens ``n`` ADS streams (one node id each) over a few channels,
subscribes to the cluster, and ACKs every response at once. It parses only the envelope
(``DiscoveryResponse`` keeps ``Any`` payloads as bytes), so the measured cost is the
server's, not ours.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.synchronize
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from balanceiq.xds.protocol import StatusRegistry
from balanceiq.xds.snapshot import EDS_TYPE
from balanceiq_lab.errors import BenchError

STREAMS_PER_CHANNEL = 100


class AckListeningRegistry(StatusRegistry):
    """A :class:`StatusRegistry` that calls ``listener(node_id, version, t)`` after each ACK it
    records (``t``: ``time.monotonic()`` when the ACK came). Set as ``server.registry`` before
    ``server.start()``."""

    def __init__(self, listener: Callable[[str, str, float], None]) -> None:
        super().__init__()
        self.listener = listener

    def ack(self, node_id: str, version: str) -> None:
        now = time.monotonic()
        super().ack(node_id, version)
        self.listener(node_id, version, now)


async def _sotw_stream(channel: grpc.aio.Channel, node_id: str, cluster: str, first: asyncio.Event) -> None:
    call = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()
    req = discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE, resource_names=[cluster])
    req.node.id = node_id
    await call.write(req)
    async for resp in call:
        first.set()
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=EDS_TYPE, resource_names=[cluster], version_info=resp.version_info, response_nonce=resp.nonce
            )
        )


async def _delta_stream(channel: grpc.aio.Channel, node_id: str, cluster: str, first: asyncio.Event) -> None:
    call = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )()
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=EDS_TYPE, resource_names_subscribe=[cluster])
    req.node.id = node_id
    await call.write(req)
    async for resp in call:
        first.set()
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS_TYPE, response_nonce=resp.nonce))


async def _run(target: str, prefix: str, n: int, api: str, cluster: str, ready: Any, stop: Any) -> None:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        for _ in range(max(1, -(-n // STREAMS_PER_CHANNEL)))
    ]
    stream = _delta_stream if api.endswith("delta") else _sotw_stream
    firsts = [asyncio.Event() for _ in range(n)]
    tasks = [
        asyncio.ensure_future(stream(channels[i % len(channels)], f"{prefix}-{i}", cluster, firsts[i]))
        for i in range(n)
    ]
    await asyncio.gather(*(f.wait() for f in firsts))
    ready.set()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, stop.wait)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def client_process(
    target: str,
    prefix: str,
    n: int,
    api: str,
    cluster: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    asyncio.run(_run(target, prefix, n, api, cluster, ready, stop))


class ClientProcesses:
    """``streams`` simulated clients split over two spawned processes, one core each on a
    2-core box, so the clients do not share the measured server's GIL."""

    def __init__(self, target: str, prefix: str, streams: int, api: str, cluster: str) -> None:
        self._args = (target, prefix, streams, api, cluster)
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._children: list[Any] = []

    def start(self) -> None:
        """Returns once every stream has had its first response."""
        target, prefix, streams, api, cluster = self._args
        n_procs = min(2, streams)
        readies = []
        for p in range(n_procs):
            share = streams // n_procs + (1 if p < streams % n_procs else 0)
            ready = self._ctx.Event()
            child = self._ctx.Process(
                target=client_process,
                daemon=True,
                args=(target, f"{prefix}-{p}", share, api, cluster, ready, self._stop),
            )
            child.start()
            self._children.append(child)
            readies.append(ready)
        deadline = time.monotonic() + 120
        for ready in readies:
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                raise BenchError("simulated clients did not connect within 120 s")

    def stop(self) -> None:
        self._stop.set()
        for child in self._children:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(5)
