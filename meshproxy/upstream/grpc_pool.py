"""grpc.aio channels to the runtimes' gRPC addresses, one per runtime, and raw-bytes calls on them.

How it works: the runtimes' gRPC addresses live in the snapshot's Runtime messages, not on the
Endpoint objects the balancers pick. `GrpcChannels.get(snapshot, endpoint)` keeps a name ->
channel map in step with the snapshot it was last asked with (an identity check per call);
when the snapshot changes, channels of runtimes that left or moved are closed after a grace
period so calls in flight on them finish. Channels are made on first use, inside the loop.
A channel is one HTTP/2 connection that grpc core keeps up (reconnects, GOAWAY, flow control);
its multi-callables are cached per method, with identity (de)serializers: bytes in, bytes out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc


def _identity(data: bytes) -> bytes:
    return data


class GrpcChannel:
    """One channel to one runtime and its cached raw-bytes callables."""

    __slots__ = ("name", "address", "channel", "_unary", "_stream")

    def __init__(self, name: str, address: str, options: list[tuple[str, Any]]):
        self.name = name
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._stream: dict[str, grpc.aio.StreamStreamMultiCallable] = {}

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        mc = self._unary.get(method)
        if mc is None:
            mc = self._unary[method] = self.channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity)
        return mc

    def stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable:
        mc = self._stream.get(method)
        if mc is None:
            mc = self._stream[method] = self.channel.stream_stream(
                method, request_serializer=_identity, response_deserializer=_identity)
        return mc


class GrpcChannels:
    """Channels to every runtime of the current snapshot that has a gRPC address."""

    def __init__(self, max_message_bytes: int, close_grace: float = 10.0,
                 connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self.options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # The proxy retries by the route's policy (a call that never reached the runtime
            # ends UNAVAILABLE and counts as a connect failure); grpc's own retry filter would
            # retry too and costs about 5% of the CPU of a proxied call.
            ("grpc.enable_retries", 0),
            # A runtime that comes back is found within a second, not after grpc's 2-minute
            # reconnect backoff (calls fail fast meanwhile and are retried elsewhere).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # grpc core's name for the shortest time a connection attempt (TCP and HTTP/2
            # handshakes) gets: http.connect_timeout, as for REST. At 100 ms, a runtime slower
            # than that to answer the handshake failed the first call on every new connection.
            ("grpc.min_reconnect_backoff_ms", max(1, round(connect_timeout * 1000))),
            # Each runtime gets its own connection, not one shared through the global pool.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.close_grace = close_grace
        self._snapshot: object = None
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, GrpcChannel] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, snapshot, endpoint) -> GrpcChannel | None:
        """The channel to `endpoint`'s runtime, or None when it has no gRPC address."""
        if snapshot is not self._snapshot:
            self._refresh(snapshot)
        ch = self._channels.get(endpoint.name)
        if ch is None:
            address = self._addresses.get(endpoint.name)
            if not address:
                return None
            ch = self._channels[endpoint.name] = GrpcChannel(endpoint.name, address, self.options)
        return ch

    def _refresh(self, snapshot) -> None:
        self._snapshot = snapshot
        self._addresses = {rt.name: rt.grpc_address for rt in snapshot.runtimes}
        for name, ch in list(self._channels.items()):
            if self._addresses.get(name) != ch.address:
                del self._channels[name]
                self._close(ch, self.close_grace)

    def _close(self, ch: GrpcChannel, grace: float | None) -> None:
        task = asyncio.get_running_loop().create_task(ch.channel.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, grace: float | None = None) -> None:
        """Close every channel; calls still running get `grace` seconds."""
        for ch in self._channels.values():
            self._close(ch, grace)
        self._channels.clear()
        self._snapshot = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def connected(channel: grpc.aio.Channel, timeout: float) -> None:
    """Return once `channel` is READY. Raises ConnectionError as soon as it fails to connect
    (so the caller can go to another address at once), TimeoutError after `timeout`."""
    async with asyncio.timeout(timeout):
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise ConnectionError("cannot connect")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)
