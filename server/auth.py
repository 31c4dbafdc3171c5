"""Bearer-token authentication as a grpc.aio server interceptor (health and reflection stay open)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from tokenwire.server.refuse import refuse_request_stream

# Methods anyone may call: probes must work without secrets, and the schema is public anyway.
OPEN_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_DENIED = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


def load_token(token: str | None, token_file: str | None) -> str | None:
    """The configured bearer token: ``token`` as given, or the stripped contents of ``token_file``.

    Raises:
        ValueError: the file cannot be read or holds no usable token.
    """
    if token_file is None:
        return token
    try:
        text = Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"auth_token_file {token_file!r} cannot be read: {exc.strerror}") from None
    if not text or any(not 33 <= ord(c) <= 126 for c in text):
        raise ValueError(f"auth_token_file {token_file!r} must hold one token of printable ASCII without spaces")
    return text


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        # NOTE: the auth scheme is case-insensitive (RFC 7235); the token itself is not.
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED.

    Args:
        token: the token callers must present.
        open_prefixes: method-name prefixes that need no token (health, reflection).
    """

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._token = token.encode("utf-8")
        self._open_prefixes = open_prefixes

    def is_authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether ``metadata`` carries the right token (compared in constant time)."""
        presented = bearer_token(metadata)
        # NOTE: compare_digest takes time independent of where the bytes differ, so the token
        # cannot be guessed byte by byte from response times.
        return presented is not None and hmac.compare_digest(presented.encode("utf-8"), self._token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorized and open calls on; answer the rest with UNAUTHENTICATED."""
        method = handler_call_details.method
        if method.startswith(self._open_prefixes) or self.is_authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]  # unknown method: UNIMPLEMENTED, as without auth
        return deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, _DENIED)


def deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that ends every call with ``code``.

    NOTE: grpc.aio drives a handler by its kind; a unary deny handler on a bidi method would
    misread the stream, so the kind must match.
    """

    async def deny(_request: Any, context: aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def deny_stream(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        await refuse_request_stream(requests, context, code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
