"""Targets, credentials and channel options: how the client turns its config into gRPC channels."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Union

import grpc
import grpc.aio

from tokenwire.client.config import ClientConfig

USER_AGENT = "tokenwire-python/0.1"
# NOTE: targets grpc connects to as they are (its own resolver, one connection at a time).
_PASSTHROUGH_SCHEMES = ("unix:", "unix-abstract:", "vsock:")
_ADDRESS_LIST_SCHEMES = ("ipv4:", "ipv6:")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\],]+):(?P<port>\d{1,5})$")
_TARGET_FORMS = "host:port, unix:path, dns:///name:port or ipv4:addr:port,addr:port"


@dataclass(frozen=True)
class Endpoint:
    """One server the client opens one channel to.

    Attributes:
        target: the gRPC target of the channel (`host:port`, `unix:path`, `ipv4:1.2.3.4:50051`).
        authority: the host name the server is known by when `target` is a resolved address
            (used for TLS verification and the `:authority` header); None otherwise.
    """

    target: str
    authority: str | None = None


@dataclass(frozen=True)
class DnsName:
    """A `dns:///name:port` target: every address the name resolves to is a replica.

    Attributes:
        host: the name to resolve.
        port: the servers' port.
    """

    host: str
    port: int

    def endpoint(self, address: str) -> Endpoint:
        """The endpoint of one resolved IP address."""
        ip = ipaddress.ip_address(address)
        target = f"ipv4:{ip}:{self.port}" if ip.version == 4 else f"ipv6:[{ip}]:{self.port}"
        return Endpoint(target=target, authority=self.host)


Target = Union[Endpoint, DnsName]
"""A parsed target: one server, or a DNS name whose addresses are the replicas."""


def _host_port(text: str, original: str) -> tuple[str, int]:
    match = _HOST_PORT.match(text)
    if match is None or not 0 < int(match.group("port")) < 65536:
        raise ValueError(f"target {original!r} must be {_TARGET_FORMS}")
    return match.group("host"), int(match.group("port"))


def parse_target(target: str) -> list[Target]:
    """Check one target string and split it into the servers it names.

    Args:
        target: `host:port`, `[v6addr]:port`, `unix:path`, `unix:///abs/path`,
            `dns:///name:port` (every address of the name is a replica), or `ipv4:a:port,b:port`
            / `ipv6:[a]:port,...` (every address listed is a replica).

    Returns:
        The endpoints it names, or the DNS name to resolve.

    Raises:
        ValueError: the target is malformed (e.g. a host without a port).
    """
    text = target.strip()
    lowered = text.lower()
    if lowered.startswith(_PASSTHROUGH_SCHEMES):
        scheme, _, rest = text.partition(":")
        if not rest.strip("/"):
            raise ValueError(f"target {target!r} names no address after '{scheme}:'")
        return [Endpoint(text)]
    if lowered.startswith(_ADDRESS_LIST_SCHEMES):
        scheme, _, rest = text.partition(":")
        addresses = [a.strip() for a in rest.split(",")]
        for address in addresses:
            _host_port(address, target)
        return [Endpoint(f"{scheme.lower()}:{address}") for address in addresses]
    if lowered.startswith("dns:"):
        rest = text[4:]
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:
                raise ValueError(f"target {target!r}: a DNS server in the target is not supported; use dns:///name:port")
        host, port = _host_port(rest, target)
        return [DnsName(host=host.strip("[]"), port=port)]
    _host_port(text, target)
    return [Endpoint(text)]


def channel_options(config: ClientConfig, endpoint: Endpoint) -> list[tuple[str, str | int]]:
    """The gRPC channel arguments for one endpoint: keepalive, TLS name, authority, reconnects.

    Args:
        config: the client's configuration.
        endpoint: the endpoint the channel connects to.
    """
    options: list[tuple[str, str | int]] = [
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.max_reconnect_backoff_ms", int(config.max_reconnect_backoff_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", min(1000, int(config.max_reconnect_backoff_s * 1000))),
        ("grpc.max_send_message_length", config.max_message_size),
        ("grpc.max_receive_message_length", config.max_message_size),
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
    server_name = config.tls.server_name if config.tls is not None else None
    if endpoint.authority is not None:
        options.append(("grpc.default_authority", endpoint.authority))
        server_name = server_name or (endpoint.authority if config.tls is not None else None)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
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
