"""Typed client errors, one per gRPC status, and the one mapping from a status to its class."""

from __future__ import annotations

from typing import ClassVar

import grpc


class TokenwireError(Exception):
    """Base class of every error the tokenwire client raises for a failed call or request.

    Attributes:
        code: the gRPC status this error stands for.
        details: the server's (or the client's) explanation, in words.
        request_id: the generation request that failed, when the error belongs to one.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, request_id: str | None = None) -> None:
        self.details = details
        self.request_id = request_id
        prefix = f"[{self.code.name}]"
        if request_id is not None:
            prefix += f" request {request_id}:"
        super().__init__(f"{prefix} {details}".rstrip())

    @property
    def retryable(self) -> bool:
        """True for statuses worth retrying before any token arrived (UNAVAILABLE, RESOURCE_EXHAUSTED)."""
        return self.code in RETRYABLE_CODES


class CancelledError(TokenwireError):
    """The call was cancelled (on the server's side; a server shutting down answers UNAVAILABLE instead)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(TokenwireError):
    """The server answered with UNKNOWN, or with a status number this client does not know."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TokenwireError, ValueError):
    """A parameter or the prompt was rejected (bad sampling value, prompt too long, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TokenwireError, TimeoutError):
    """The call or request ran past its timeout; a generation is cancelled on the server."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TokenwireError):
    """The named thing does not exist on the server (e.g. an unknown health service)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TokenwireError):
    """A request id is already in use among the stream's open requests."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TokenwireError):
    """The caller is known but not allowed to make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TokenwireError):
    """The server is overloaded (its queue or its stream limit is full); retried before any token."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# NOTE: the name callers look for when they think "the server is busy".
OverloadedError = ResourceExhaustedError


class FailedPreconditionError(TokenwireError):
    """The server is not in a state to run the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TokenwireError):
    """The server aborted the call."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(TokenwireError):
    """A value was outside the range the server accepts."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TokenwireError):
    """The server does not implement this method (an older or different server)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TokenwireError):
    """The server failed in a way it did not expect."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(TokenwireError, ConnectionError):
    """The server cannot be reached or is shutting down; retried before any token arrived."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TokenwireError):
    """Unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TokenwireError):
    """The call carried no valid credentials (missing or wrong bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ClientClosedError(TokenwireError):
    """The client was closed while the call or request was open, or before it started."""

    code = grpc.StatusCode.CANCELLED


RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

_BY_CODE: dict[grpc.StatusCode, type[TokenwireError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode | int) -> type[TokenwireError]:
    """The error class for a gRPC status, given as a `grpc.StatusCode` or its number.

    Args:
        code: the status; unknown numbers (and OK, which is not an error) map to `UnknownError`.

    Returns:
        The `TokenwireError` subclass that stands for it.
    """
    if isinstance(code, int):
        status = _BY_NUMBER.get(code)
        if status is None:
            return UnknownError
        code = status
    return _BY_CODE.get(code, UnknownError)


def error_from_code(
    code: grpc.StatusCode | int, details: str, *, request_id: str | None = None
) -> TokenwireError:
    """Build the typed error for a status code (also used for in-band per-request errors).

    Args:
        code: the status, as a `grpc.StatusCode` or the number a `RequestError.code` carries.
        details: what went wrong, in words.
        request_id: the request it belongs to, if any.

    Returns:
        An instance of the matching `TokenwireError` subclass.
    """
    cls = error_class(code)
    if cls is UnknownError and isinstance(code, int) and code not in _BY_NUMBER:
        details = f"status {code}: {details}"
    return cls(details, request_id=request_id)


def error_from_rpc(error: grpc.RpcError, *, request_id: str | None = None) -> TokenwireError:
    """Turn a failed gRPC call into the typed error for its status.

    Args:
        error: what grpcio raised (an `AioRpcError` or a sync `Call` error).
        request_id: the request it belongs to, if any.

    Returns:
        An instance of the matching `TokenwireError` subclass, with the call's details.
    """
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(error)
    return error_from_code(code or grpc.StatusCode.UNKNOWN, details or "", request_id=request_id)
