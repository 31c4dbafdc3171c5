"""Targets, credentials and channel options: how the client turns its config into gRPC channels."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc
import grpc.aio

from tokenwire.client.config import ClientConfig

USER_AGENT = "tokenwire-python/0.1"
# NOTE: these resolvers may yield several addresses for one target; round robin spreads new
# streams across all of them instead of pinning every stream to the first (pick_first).
_BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")
_PASSTHROUGH_SCHEMES = ("unix:", "unix-abstract:", "vsock:") + _BALANCED_SCHEMES
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")
_ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
DEFAULT_STREAMS_SINGLE = 1
DEFAULT_STREAMS_BALANCED = 8


@dataclass(frozen=True)
class Endpoint:
    """One target the client talks to, parsed.

    Attributes:
        target: the gRPC target string, as given.
        round_robin: whether the channel balances calls across the target's addresses.
    """

    target: str
    round_robin: bool

    @classmethod
    def parse(cls, target: str) -> Endpoint:
        """Check one target and tell how its channel should balance.

        Args:
            target: `host:port`, `[v6addr]:port`, `unix:path`, `unix:///abs/path`,
                `dns:///name:port`, `ipv4:a:port,b:port` or `ipv6:...`.

        Raises:
            ValueError: the target is malformed (e.g. a host without a port).
        """
        target = target.strip()
        lowered = target.lower()
        if lowered.startswith(_PASSTHROUGH_SCHEMES):
            scheme, _, rest = target.partition(":")
            if not rest.strip("/"):
                raise ValueError(f"target {target!r} names no address after '{scheme}:'")
            return cls(target=target, round_robin=lowered.startswith(_BALANCED_SCHEMES))
        match = _HOST_PORT.match(target)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ValueError(
                f"target {target!r} must be host:port, unix:path, dns:///name:port or ipv4:addr:port,..."
            )
        return cls(target=target, round_robin=False)


def channel_options(config: ClientConfig, endpoint: Endpoint) -> list[tuple[str, str | int]]:
    """The gRPC channel arguments for one endpoint: keepalive, balancing, TLS name, reconnects.

    Args:
        config: the client's configuration.
        endpoint: the endpoint the channel connects to.
    """
    options: list[tuple[str, str | int]] = [
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.max_reconnect_backoff_ms", int(config.max_reconnect_backoff_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", min(1000, int(config.max_reconnect_backoff_s * 1000))),
    ]
    if config.keepalive.time_s > 0:
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive.timeout_s * 1000)),
            # NOTE: the Generate stream may stay open and quiet for long; keep pinging under it
            # (the default stops after two pings without data). No pings without an open call,
            # which servers refuse unless they set keepalive_permit_without_calls.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
    if endpoint.round_robin:
        options.append(("grpc.service_config", _ROUND_ROBIN_CONFIG))
    if config.tls is not None and config.tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    options.extend(config.channel_options)
    return options


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials (server verification, plus a client certificate for mTLS); None for plaintext."""
    tls = config.tls
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert,  # type: ignore[arg-type]  # bytes after __post_init__
        private_key=tls.client_key,  # type: ignore[arg-type]
        certificate_chain=tls.client_cert,  # type: ignore[arg-type]
    )


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    """Metadata sent on every call: the bearer token, if any.

    NOTE: sent as plain metadata rather than call credentials, which grpcio only allows on TLS
    channels; a sidecar on loopback or a unix socket needs the token over plaintext too.
    """
    if config.token is None:
        return ()
    return (("authorization", f"Bearer {config.token}"),)


def open_channel(config: ClientConfig, endpoint: Endpoint) -> grpc.aio.Channel:
    """Open an asyncio channel to one endpoint (must run on the event loop that will use it)."""
    options = channel_options(config, endpoint)
    credentials = channel_credentials(config)
    if credentials is None:
        return grpc.aio.insecure_channel(endpoint.target, options=options)
    return grpc.aio.secure_channel(endpoint.target, credentials, options=options)


def streams_per_endpoint(config: ClientConfig, endpoint: Endpoint) -> int:
    """How many Generate streams the client may open to one endpoint."""
    if config.streams_per_target is not None:
        return config.streams_per_target
    return DEFAULT_STREAMS_BALANCED if endpoint.round_robin else DEFAULT_STREAMS_SINGLE
