"""Simulated xDS clients for the benchmark: real gRPC streams that ACK like Envoy does.

Each client process opens ``n`` ADS streams (one node id each) over a few channels,
subscribes to the cluster, and ACKs every response at once. It parses only the envelope
(``DiscoveryResponse`` keeps ``Any`` payloads as bytes), so the measured cost is the
server's, not ours.
"""

from __future__ import annotations

import asyncio
import multiprocessing.synchronize
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from balanceiq.xds.snapshot import EDS_TYPE

STREAMS_PER_CHANNEL = 100


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
