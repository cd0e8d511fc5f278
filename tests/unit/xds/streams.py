"""One bidirectional xDS stream over real gRPC, for the xDS server tests.

Requests go in a queue; a reader thread puts each response, or the ``grpc.RpcError`` that
ended the stream, in another, so a test can wait for either with a timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

WAIT = 5.0


class XdsStream:
    def __init__(self, method: Callable[[Iterator[Any]], Any]) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.call = method(self._iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[Any]:
        while (req := self._requests.get()) is not None:
            yield req

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except grpc.RpcError as exc:
            self.responses.put(exc)

    def send(self, req: Any) -> None:
        self._requests.put(req)

    def recv(self, timeout: float = WAIT) -> Any:
        try:
            item = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no xDS response within {timeout}s") from None
        if isinstance(item, grpc.RpcError):
            raise AssertionError(f"stream failed: {item}")
        return item

    def ended_with(self, timeout: float = WAIT) -> grpc.RpcError:
        """The status the server ended the stream with (responses before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.responses.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, grpc.RpcError):
                return item

    def expect_nothing(self, wait: float = 0.3) -> None:
        """Nothing arrives, and the stream is still open."""
        try:
            item = self.responses.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected response: {item}")

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self._reader.join(WAIT)


def _identity(b: bytes) -> bytes:
    return b


def _as_bytes(msg: Any) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()  # type: ignore[no-any-return]


def raw_stream(channel: grpc.Channel, method: str) -> XdsStream:
    """A stream on ``method`` (its full path) that puts bytes on the wire as they are given,
    so a test can send garbage; messages are serialized, responses stay bytes."""
    return XdsStream(channel.stream_stream(method, request_serializer=_as_bytes, response_deserializer=_identity))
