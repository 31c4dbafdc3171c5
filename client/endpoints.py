"""The client's replicas: one channel per target, which one takes the next call, and a cooldown after failures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc.aio

from tokenwire.client.channel import Endpoint, open_channel, streams_per_endpoint
from tokenwire.client.config import ClientConfig
from tokenwire.client.v1 import generation_pb2_grpc

# NOTE: the first cooldown after a failure is short (a replica restarting or a blip); repeated
# failures back off up to the config's max_reconnect_backoff_s.
_FIRST_COOLDOWN_S = 0.5


@dataclass(eq=False)
class Replica:
    """One target and its channel, opened lazily on the event loop that uses it.

    Attributes:
        endpoint: the parsed target.
        max_streams: most Generate streams the client opens to it.
        load: requests open on it now (routed to one of its streams and not finished).
        failures: failures in a row; reset by any successful answer.
        cooldown_until: event-loop time before which other replicas are preferred.
    """

    endpoint: Endpoint
    max_streams: int
    load: int = 0
    failures: int = 0
    cooldown_until: float = 0.0
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)
    _stub: generation_pb2_grpc.GenerationServiceStub | None = field(default=None, repr=False)

    def channel(self, config: ClientConfig) -> grpc.aio.Channel:
        """The replica's channel, opened on first use."""
        if self._channel is None:
            self._channel = open_channel(config, self.endpoint)
        return self._channel

    def stub(self, config: ClientConfig) -> generation_pb2_grpc.GenerationServiceStub:
        """The GenerationService stub on the replica's channel."""
        if self._stub is None:
            self._stub = generation_pb2_grpc.GenerationServiceStub(self.channel(config))
        return self._stub

    async def close(self) -> None:
        """Close the channel (open calls on it end with CANCELLED)."""
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()


class ReplicaSet:
    """The targets of one client and the choice of which takes the next request.

    The least loaded replica outside its cooldown wins; ties go round robin, so sequential
    requests also spread. When every replica is cooling down, all are candidates again.
    """

    def __init__(self, config: ClientConfig) -> None:
        """Parse the config's targets (no connection is made until the first call).

        Raises:
            ValueError: a target is malformed.
        """
        self.config = config
        self.replicas = [
            Replica(endpoint=ep, max_streams=streams_per_endpoint(config, ep))
            for ep in map(Endpoint.parse, config.targets)
        ]
        self._turn = 0

    def pick(self, exclude: Replica | None = None) -> Replica:
        """The replica for the next call.

        Args:
            exclude: a replica to avoid when another one is available (the one that just failed).
        """
        now = asyncio.get_running_loop().time()
        pool = [r for r in self.replicas if r is not exclude] or self.replicas
        candidates = [r for r in pool if r.cooldown_until <= now] or pool
        start = self._turn % len(candidates)
        self._turn += 1
        rotated = candidates[start:] + candidates[:start]
        # NOTE: min() returns the first of equal loads, so the rotation breaks ties round robin.
        return min(rotated, key=lambda r: r.load)

    def mark_failed(self, replica: Replica) -> None:
        """Note a connection-level failure: prefer other replicas for a while, longer each time."""
        replica.failures += 1
        delay = min(self.config.max_reconnect_backoff_s, _FIRST_COOLDOWN_S * 2 ** (replica.failures - 1))
        replica.cooldown_until = asyncio.get_running_loop().time() + delay

    @staticmethod
    def mark_ok(replica: Replica) -> None:
        """Note a successful answer: the replica is healthy again."""
        replica.failures = 0
        replica.cooldown_until = 0.0

    async def close(self) -> None:
        """Close every replica's channel."""
        await asyncio.gather(*(r.close() for r in self.replicas))
