"""The client's replicas: one channel per server, DNS names expanded to their addresses, and the choice of server."""

from __future__ import annotations

import asyncio
import math
import socket
from dataclasses import dataclass, field

import grpc.aio

from tokenwire.client.channel import DnsName, Endpoint, open_channel, parse_target
from tokenwire.client.config import ClientConfig
from tokenwire.client.errors import UnavailableError
from tokenwire.client.v1 import generation_pb2_grpc

# NOTE: the first cooldown after a failure is short (a replica restarting or a blip); repeated
# failures back off up to the config's max_reconnect_backoff_s.
_FIRST_COOLDOWN_S = 0.5
# A failing replica of a DNS name triggers a fresh lookup, at most this often.
_MIN_REFRESH_S = 1.0


@dataclass(eq=False)
class Replica:
    """One server and its channel, opened lazily on the event loop that uses it.

    Attributes:
        endpoint: where the server is.
        max_streams: most Generate streams the client opens to it.
        load: requests open on it now (routed to one of its streams and not finished).
        failures: failures in a row; reset by any successful answer.
        cooldown_until: event-loop time before which other replicas are preferred.
        retired: its address left the DNS answer; it takes no new requests.
    """

    endpoint: Endpoint
    max_streams: int
    load: int = 0
    failures: int = 0
    cooldown_until: float = 0.0
    retired: bool = False
    group: DnsGroup | None = field(default=None, repr=False)
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


class DnsGroup:
    """The replicas of one `dns:///name:port` target: one per address, refreshed from DNS.

    NOTE: the client resolves the name itself rather than handing it to gRPC's round_robin
    policy: that policy balances calls, but a multiplexed stream is one long call, so every
    stream opened while only the first address was connected stayed pinned to it. One channel
    per address lets the client place each request on the least loaded server.
    """

    def __init__(self, name: DnsName, config: ClientConfig) -> None:
        """Nothing is resolved until `resolve()`."""
        self.name = name
        self.config = config
        self.replicas: dict[str, Replica] = {}
        self.attempted = False
        self.error: str | None = None
        self.resolved_at = -math.inf
        self._task: asyncio.Future[None] | None = None

    def live(self) -> list[Replica]:
        """The replicas that take new requests."""
        return [r for r in self.replicas.values() if not r.retired]

    async def resolve(self) -> None:
        """Look the name up; add new addresses, retire vanished ones (a failed lookup keeps the old)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.name.host, self.name.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.error = f"cannot resolve {self.name.host!r}: {exc}"
            infos = None
        self.attempted = True
        self.resolved_at = loop.time()
        if infos is None:
            return
        self.error = None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            replica = self.replicas.get(address)
            if replica is None:
                self.replicas[address] = Replica(
                    endpoint=self.name.endpoint(address), max_streams=self.config.streams_per_server, group=self
                )
            else:
                replica.retired = False
        for address, replica in list(self.replicas.items()):
            if address not in addresses:
                replica.retired = True
                if replica.load == 0:
                    del self.replicas[address]
                    await replica.close()

    def refresh_soon(self) -> None:
        """Start a lookup in the background unless one is running."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.resolve())

    async def close(self) -> None:
        """Stop a running lookup and close every replica's channel."""
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(r.close() for r in self.replicas.values()))


class ReplicaSet:
    """The servers of one client and the choice of which takes the next request.

    The least loaded replica outside its cooldown wins; ties go round robin, so sequential
    requests also spread. When every replica is cooling down, all are candidates again.
    """

    def __init__(self, config: ClientConfig) -> None:
        """Parse the config's targets (no connection and no DNS lookup until the first call).

        Raises:
            ValueError: a target is malformed.
        """
        self.config = config
        self._static: list[Replica] = []
        self._groups: list[DnsGroup] = []
        for target in config.targets:
            for parsed in parse_target(target):
                if isinstance(parsed, DnsName):
                    self._groups.append(DnsGroup(parsed, config))
                else:
                    self._static.append(Replica(endpoint=parsed, max_streams=config.streams_per_server))
        self._turn = 0

    @property
    def resolved(self) -> bool:
        """True once every DNS name has been looked up at least once."""
        return all(g.attempted for g in self._groups)

    async def resolve(self) -> None:
        """Look up the DNS names never looked up yet."""
        await asyncio.gather(*(g.resolve() for g in self._groups if not g.attempted))

    def live(self) -> list[Replica]:
        """Every replica that takes new requests."""
        return self._static + [r for g in self._groups for r in g.live()]

    def require_live(self) -> list[Replica]:
        """The replicas that take new requests, refreshing stale DNS answers in the background.

        Raises:
            UnavailableError: no server is known (every DNS name failed to resolve or is empty).
        """
        now = asyncio.get_running_loop().time()
        for group in self._groups:
            if now - group.resolved_at >= self.config.dns_refresh_s or not group.live():
                group.refresh_soon()
        live = self.live()
        if not live:
            reasons = [g.error or f"{g.name.host!r} has no addresses" for g in self._groups]
            raise UnavailableError("no server to send to: " + "; ".join(reasons))
        return live

    def pick(self, exclude: Replica | None = None) -> Replica:
        """The replica for the next call (after `resolve()`).

        Args:
            exclude: a replica to avoid when another one is available (the one that just failed).

        Raises:
            UnavailableError: no server is known (every DNS name failed to resolve or is empty).
        """
        now = asyncio.get_running_loop().time()
        live = self.require_live()
        pool = [r for r in live if r is not exclude] or live
        candidates = [r for r in pool if r.cooldown_until <= now] or pool
        start = self._turn % len(candidates)
        self._turn += 1
        rotated = candidates[start:] + candidates[:start]
        # NOTE: min() returns the first of equal loads, so the rotation breaks ties round robin.
        return min(rotated, key=lambda r: r.load)

    def mark_failed(self, replica: Replica) -> None:
        """Note a connection-level failure: prefer other replicas for a while, longer each time."""
        now = asyncio.get_running_loop().time()
        replica.failures += 1
        delay = min(self.config.max_reconnect_backoff_s, _FIRST_COOLDOWN_S * 2 ** (replica.failures - 1))
        replica.cooldown_until = now + delay
        if replica.group is not None and now - replica.group.resolved_at >= _MIN_REFRESH_S:
            replica.group.refresh_soon()

    @staticmethod
    def mark_ok(replica: Replica) -> None:
        """Note a successful answer: the replica is healthy again."""
        replica.failures = 0
        replica.cooldown_until = 0.0

    async def close(self) -> None:
        """Close every channel and stop DNS lookups."""
        await asyncio.gather(*(r.close() for r in self._static), *(g.close() for g in self._groups))
