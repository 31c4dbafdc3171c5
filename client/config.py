"""Client configuration as frozen dataclasses: targets, TLS, keepalive, retries, timeouts, stream pool."""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Union


class _Default(enum.Enum):
    """The type of `DEFAULT`."""

    TOKEN = "default"


DEFAULT = _Default.TOKEN
"""Per-call `timeout` default: use the client's `ClientConfig.timeout`."""
TimeoutArg = Union[float, None, _Default]
"""A per-call timeout: seconds, None for no limit, or DEFAULT for the client's default."""


def _read_pem(name: str, value: str | Path | bytes | None) -> bytes | None:
    """PEM bytes from bytes (as is) or a file path; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {value!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class TLSConfig:
    """Transport security: server verification, and a client certificate for mutual TLS.

    Paths are read once, when the config is built; PEM bytes are taken as they are.

    Attributes:
        ca_cert: PEM of the CA that signed the server's certificate; None uses the system roots.
        client_cert: PEM certificate chain presented to the server (mutual TLS); needs client_key.
        client_key: PEM private key of client_cert.
        server_name: the name to verify in the server's certificate when it differs from the
            target's host (e.g. connecting to 127.0.0.1 with a certificate for "localhost").
    """

    ca_cert: str | Path | bytes | None = None
    client_cert: str | Path | bytes | None = None
    client_key: str | Path | bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLSConfig: client_cert and client_key must be given together (mutual TLS)")
        if self.server_name is not None and not self.server_name:
            raise ValueError("TLSConfig.server_name must be a non-empty host name when set")
        # NOTE: read files now so a wrong path fails at construction, not on the first call.
        object.__setattr__(self, "ca_cert", _read_pem("ca_cert", self.ca_cert))
        object.__setattr__(self, "client_cert", _read_pem("client_cert", self.client_cert))
        object.__setattr__(self, "client_key", _read_pem("client_key", self.client_key))


@dataclass(frozen=True)
class KeepaliveConfig:
    """HTTP/2 keepalive pings, which find a dead connection under a long, quiet stream.

    The server must allow pings this often: its `grpc.http2.min_ping_interval_without_data_ms`
    must not exceed `time_s` (tokenwire's server allows one every 10 s), or it closes the
    connection with GOAWAY "too_many_pings".

    Attributes:
        time_s: seconds between pings while a call is open; 0 turns keepalive off.
        timeout_s: seconds to wait for a ping's answer before the connection counts as dead.
    """

    time_s: float = 30.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not (self.time_s == 0 or 1.0 <= self.time_s < math.inf):
            raise ValueError(f"KeepaliveConfig.time_s must be 0 (off) or >= 1 second, got {self.time_s}")
        if not 0 < self.timeout_s < math.inf:
            raise ValueError(f"KeepaliveConfig.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RetryPolicy:
    """How requests that failed before their first token are tried again.

    Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, and a generation only while it has not
    received a token: a retried request never repeats text the caller has already seen.

    Attributes:
        max_attempts: tries in all, the first included; 1 turns retries off.
        initial_backoff_s: wait before the second try.
        max_backoff_s: the longest wait between tries.
        multiplier: growth of the wait from one try to the next.
        jitter: each wait is scaled by a random factor in [1 - jitter, 1 + jitter].
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s < math.inf:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if not 1.0 <= self.multiplier < math.inf:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter}")

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before try number `attempt + 1`, after `attempt` failed tries (>= 1)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, attempt - 1))
        return base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)


@dataclass(frozen=True)
class ClientConfig:
    """Everything a `Client` or `AsyncClient` is built from; validated once, here.

    Attributes:
        targets: one or more servers. Each is `host:port`, `unix:path` (`unix:///abs/path`),
            `dns:///name:port` (every address the name resolves to is a replica) or
            `ipv4:a:port,b:port` (every address listed is a replica). Several targets are
            several replicas; each request goes to the least loaded one, ties round robin.
        token: bearer token sent as `authorization: Bearer <token>` on every call.
        tls: transport security; None for a plaintext connection (loopback, unix socket).
        timeout: default seconds for every call and generation; None waits without limit.
        keepalive: keepalive pings; see `KeepaliveConfig`.
        retry: retries before the first token; see `RetryPolicy`.
        streams_per_server: most `Generate` streams opened to one server; they open one by one
            as concurrent requests need them. One stream carries any number of requests.
        max_reconnect_backoff_s: the longest wait between attempts to reconnect to a server.
        dns_refresh_s: seconds between lookups of a `dns:///` name (replicas come and go).
        max_message_size: largest message, in bytes, sent or received; as the server's
            `--max-message-size` (4 MiB by default). A larger request is refused here with
            `InvalidArgumentError`: sent, it would end the whole Generate stream it shares.
        channel_options: extra raw gRPC channel arguments, applied last.
    """

    targets: tuple[str, ...]
    token: str | None = None
    tls: TLSConfig | None = None
    timeout: float | None = None
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    streams_per_server: int = 1
    max_reconnect_backoff_s: float = 5.0
    dns_refresh_s: float = 30.0
    max_message_size: int = 4 * 1024 * 1024
    channel_options: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ValueError("targets must name at least one server")
        for target in targets:
            if not isinstance(target, str) or not target.strip():
                raise ValueError(f"every target must be a non-empty string, got {target!r}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must not repeat, got {list(targets)}")
        object.__setattr__(self, "targets", targets)
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("token must be a non-empty string without line breaks")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {self.timeout}")
        if self.streams_per_server < 1:
            raise ValueError(f"streams_per_server must be >= 1, got {self.streams_per_server}")
        if not 0 < self.dns_refresh_s < math.inf:
            raise ValueError(f"dns_refresh_s must be > 0, got {self.dns_refresh_s}")
        if not 0 < self.max_reconnect_backoff_s < math.inf:
            raise ValueError(f"max_reconnect_backoff_s must be > 0, got {self.max_reconnect_backoff_s}")
        if self.max_message_size < 1024:
            raise ValueError(f"max_message_size must be >= 1024 bytes, got {self.max_message_size}")
        object.__setattr__(self, "channel_options", tuple(tuple(o) for o in self.channel_options))

    def resolve_timeout(self, timeout: TimeoutArg) -> float | None:
        """A call's timeout in seconds: its own, or the client's default for DEFAULT.

        Raises:
            ValueError: a timeout that is not a positive number (or None).
        """
        if timeout is DEFAULT:
            return self.timeout
        if timeout is not None and not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        return timeout



class ClientOptions(TypedDict, total=False):
    """The keyword arguments `Client` and `AsyncClient` take besides the target (see `ClientConfig`)."""

    token: str | None
    tls: TLSConfig | None
    timeout: float | None
    keepalive: KeepaliveConfig
    retry: RetryPolicy
    streams_per_server: int
    max_reconnect_backoff_s: float
    dns_refresh_s: float
    max_message_size: int
    channel_options: tuple[tuple[str, str | int], ...]
