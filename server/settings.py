"""Server settings: one frozen dataclass, read once from command-line flags and TOKENWIRE_* variables."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from tokenwire.engine.config import EngineArgs

ENV_PREFIX = "TOKENWIRE_"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
_MAX_PORT = 65535


@dataclass(frozen=True)
class Settings:
    """Everything `tokenwire serve` is configured with (flags win over environment variables).

    Attributes:
        host: address to listen on (TCP); ignored when ``unix_socket`` is set.
        port: TCP port; 0 picks a free one.
        unix_socket: listen on this Unix domain socket path instead of TCP.
        model: a .gguf file or a Hugging Face folder; None serves the embedded default model.
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        block_size: tokens per KV cache block.
        kv_cache_memory: KV pool size in bytes, or a fraction (0, 1] of free CUDA memory; None: default.
        kv_cache_dtype: the KV cache's element type: "auto" (the model's dtype), "float32",
            "bfloat16" or "float16" (twice the tokens in the same memory for a float32 model).
        max_num_seqs: most sequences in one engine step.
        max_num_batched_tokens: most tokens in one engine step.
        max_queued_requests: most requests waiting for admission; more are rejected (RESOURCE_EXHAUSTED).
        max_model_len: most tokens (prompt plus completion) per request; None: the model's limit.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        speculative_tokens: draft tokens per step (n-gram speculative decoding; greedy outputs
            unchanged, sampled ones keep their distribution); 0 is off.
        speculative_max_batch: speculate only while at most this many sequences run.
        native_kernels: on CPU, attend decodes through the C++ kernel built at start-up (falls
            back to torch, with a warning, where no compiler is found).
        seed: seed of the random draws of requests that set no seed of their own.
        auth_token: bearer token required on every call except health and reflection.
        auth_token_file: file holding the bearer token (read at start; surrounding whitespace dropped).
        tls_cert: PEM certificate chain of the server; enables TLS with ``tls_key``.
        tls_key: PEM private key of the server.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
        metrics_host: address of the Prometheus HTTP endpoint.
        metrics_port: port of the Prometheus HTTP endpoint; 0 turns metrics off.
        log_format: "json", "console", or "auto" (JSON unless stderr is a terminal).
        log_level: "debug", "info", "warning" or "error".
        log_requests_content: also log prompts and outputs (off by default: they may be private).
        grace_period: seconds open requests get to finish after SIGTERM/SIGINT.
        max_message_size: largest gRPC message, in bytes, in either direction.
        max_concurrent_rpcs: most GenerationService calls at once (Generate streams, Tokenize,
            GetModelInfo; more get RESOURCE_EXHAUSTED; health and reflection are not counted); None: no limit.
        max_connection_age: seconds after which a connection is asked to reconnect (spreads
            long-lived clients over replicas behind a load balancer); None: never.
        max_connection_age_grace: seconds open calls keep running on a connection past its age.
    """

    host: str = "0.0.0.0"
    port: int = 50051
    unix_socket: str | None = None
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_queued_requests: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    speculative_tokens: int = 0
    speculative_max_batch: int = 4
    native_kernels: bool = True
    seed: int = 0
    auth_token: str | None = None
    auth_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    log_format: str = "auto"
    log_level: str = "info"
    log_requests_content: bool = False
    grace_period: float = 30.0
    max_message_size: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int | None = None
    max_connection_age: float | None = None
    max_connection_age_grace: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= _MAX_PORT:
            raise ValueError(f"port must be in [0, {_MAX_PORT}], got {self.port}")
        if not 0 <= self.metrics_port <= _MAX_PORT:
            raise ValueError(f"metrics_port must be in [0, {_MAX_PORT}] (0 turns metrics off), got {self.metrics_port}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.unix_socket is not None and not self.unix_socket:
            raise ValueError("unix_socket must be a path when set")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        if self.auth_token is not None and not _is_token(self.auth_token):
            raise ValueError("auth_token must be 1 to 4096 printable ASCII characters without spaces")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not self.grace_period >= 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        if self.max_message_size < 1024:
            raise ValueError(f"max_message_size must be >= 1024 bytes, got {self.max_message_size}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 when set, got {self.max_concurrent_rpcs}")
        for name in ("max_connection_age", "max_connection_age_grace"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds when set, got {value}")
        # NOTE: the engine's own limits are checked once, by EngineArgs, so a bad value fails at
        # start-up with the engine's message rather than a second copy of its rules here.
        self.engine_args()

    def engine_args(self) -> EngineArgs:
        """The engine configuration these settings describe."""
        return EngineArgs(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            kv_cache_dtype=self.kv_cache_dtype,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_queued_requests=self.max_queued_requests,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            speculative_tokens=self.speculative_tokens,
            speculative_max_batch=self.speculative_max_batch,
            native_kernels=self.native_kernels,
            seed=self.seed,
        )

    @property
    def address(self) -> str:
        """The gRPC listening address (``unix:PATH`` or ``HOST:PORT``)."""
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_sources(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        """Merge parsed flags and environment variables (a flag wins over its variable).

        Args:
            args: the namespace from a parser set up by `add_arguments`.
            environ: environment variables, usually ``os.environ``.

        Raises:
            ValueError: a value does not parse or is out of range; the message names the flag
                or variable.
        """
        values: dict[str, Any] = {}
        for option in _OPTIONS:
            flag_value = getattr(args, option.field, None)
            if flag_value is not None:
                values[option.field] = flag_value
                continue
            raw = environ.get(option.env)
            if raw is None or raw == "":
                continue
            try:
                values[option.field] = option.parse(raw)
            except ValueError as exc:
                raise ValueError(f"{option.env}={raw!r}: {exc}") from None
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every server flag to ``parser`` (defaults are None so that unset flags defer to the environment)."""
    defaults = {f.name: f.default for f in fields(Settings)}
    for option in _OPTIONS:
        default = defaults[option.field]
        help_text = f"{option.help} [env {option.env}; default {_show_default(default)}]"
        if option.parse is parse_bool:
            parser.add_argument(
                option.flag, dest=option.field, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                option.flag, dest=option.field, type=option.parse, default=None, metavar=option.metavar, help=help_text
            )


def environment_variables() -> dict[str, str]:
    """Each TOKENWIRE_* variable and the command-line flag it stands for."""
    return {option.env: option.flag for option in _OPTIONS}


def parse_bool(raw: str) -> bool:
    """Parse 1/0, true/false, yes/no, on/off (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false, 1/0, yes/no, on/off), got {raw!r}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(raw: str) -> int:
    """Parse a byte count: ``1048576``, ``512MiB``, ``2G`` (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(raw)
    if match is None:
        raise ValueError(f"expected a byte count such as 1073741824, 512MiB or 2G, got {raw!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** _SIZE_POWERS[unit])


def parse_kv_cache_memory(raw: str) -> int | float:
    """Parse a KV pool size: a fraction in (0, 1] of free CUDA memory (``0.8``) or bytes (``2GiB``)."""
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        return parse_size(text)
    if 0.0 < value <= 1.0 and ("." in text or value < 1.0):
        return value
    return parse_size(text)


def _parse_optional_int(raw: str) -> int | None:
    return None if raw.strip().lower() in ("none", "auto") else int(raw)


def _parse_optional_str(raw: str) -> str | None:
    return raw or None


def _show_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _is_token(token: str) -> bool:
    return 0 < len(token) <= 4096 and all(33 <= ord(c) <= 126 for c in token)


@dataclass(frozen=True)
class _Option:
    """One setting's flag, environment variable and parser."""

    field: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    name: str | None = None  # the flag's and variable's stem when it differs from the field

    @property
    def flag(self) -> str:
        return "--" + (self.name or self.field).replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + (self.name or self.field).upper()


# NOTE: one table drives the flags, the environment variables and their parsing, so the three
# can never drift apart; docs/server.md lists the same names.
_OPTIONS: tuple[_Option, ...] = (
    _Option("host", str, "address to listen on", "HOST"),
    _Option("port", int, "TCP port (0 picks a free one)", "PORT"),
    _Option("unix_socket", _parse_optional_str, "listen on this Unix socket instead of TCP", "PATH"),
    _Option("model", _parse_optional_str, ".gguf file or Hugging Face folder (default: embedded SmolLM2-135M)", "PATH"),
    _Option("dtype", str, "auto, float32, bfloat16 or float16", "DTYPE"),
    _Option("device", str, "auto, cpu, cuda or cuda:N", "DEVICE"),
    _Option("block_size", int, "tokens per KV cache block", "N"),
    _Option("kv_cache_memory", parse_kv_cache_memory, "KV pool: bytes (2GiB) or a fraction of free CUDA memory", "SIZE"),
    _Option("kv_cache_dtype", str, "KV cache element type: auto (the model's), float32, bfloat16 or float16", "DTYPE"),
    _Option("max_num_seqs", int, "most sequences per engine step", "N"),
    _Option("max_num_batched_tokens", int, "most tokens per engine step", "N"),
    _Option("max_queued_requests", int, "most waiting requests before RESOURCE_EXHAUSTED", "N"),
    _Option("max_model_len", _parse_optional_int, "most tokens per request (prompt plus completion)", "N"),
    _Option("enable_prefix_caching", parse_bool, "reuse KV blocks of shared prompt prefixes", name="prefix_caching"),
    _Option("speculative_tokens", int, "draft tokens per step (n-gram lookup; 0 is off)", "N"),
    _Option("speculative_max_batch", int, "speculate only while at most N sequences run", "N"),
    _Option("native_kernels", parse_bool, "on CPU, decode attention in the C++ kernel (else torch)"),
    _Option("seed", int, "seed for requests without their own", "N"),
    _Option("auth_token", _parse_optional_str, "require 'authorization: Bearer TOKEN' (prefer the file or env)", "TOKEN"),
    _Option("auth_token_file", _parse_optional_str, "file holding the bearer token", "PATH"),
    _Option("tls_cert", _parse_optional_str, "PEM server certificate chain (enables TLS)", "PATH"),
    _Option("tls_key", _parse_optional_str, "PEM server private key", "PATH"),
    _Option("tls_client_ca", _parse_optional_str, "PEM CA that client certificates must chain to (mTLS)", "PATH"),
    _Option("metrics_host", str, "address of the Prometheus endpoint", "HOST"),
    _Option("metrics_port", int, "Prometheus endpoint port (0 turns it off)", "PORT"),
    _Option("log_format", str, "auto, json or console", "FORMAT"),
    _Option("log_level", str, "debug, info, warning or error", "LEVEL"),
    _Option("log_requests_content", parse_bool, "log prompts and outputs too"),
    _Option("grace_period", float, "seconds open requests get to finish on SIGTERM/SIGINT", "SECONDS"),
    _Option("max_message_size", parse_size, "largest gRPC message in bytes", "SIZE"),
    _Option("max_concurrent_rpcs", _parse_optional_int, "most RPCs at once", "N"),
    _Option("max_connection_age", float, "seconds before a connection is asked to reconnect", "SECONDS"),
    _Option("max_connection_age_grace", float, "seconds calls may run past the connection age", "SECONDS"),
)
