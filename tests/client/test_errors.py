"""Every gRPC status maps to one typed error, from a status code, a number, or a failed call."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tokenwire.client import (
    AsyncClient,
    InvalidArgumentError,
    OverloadedError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
    UnknownError,
    error_class,
)
from tokenwire.client.errors import error_from_code


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_each_status_has_its_own_class_by_code_and_by_number(code: grpc.StatusCode) -> None:
    cls = error_class(code)
    assert issubclass(cls, TokenwireError)
    assert cls.code is code
    assert error_class(code.value[0]) is cls


def test_classes_are_distinct_per_status() -> None:
    classes = {error_class(c) for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert len(classes) == len(grpc.StatusCode) - 1


def test_in_band_error_carries_request_id_details_and_retryability() -> None:
    error = error_from_code(8, "queue full", request_id="r1")
    assert isinstance(error, ResourceExhaustedError) and OverloadedError is ResourceExhaustedError
    assert (error.request_id, error.details, error.retryable) == ("r1", "queue full", True)
    assert "RESOURCE_EXHAUSTED" in str(error) and "r1" in str(error)
    assert error_from_code(3, "bad").retryable is False
    assert error_from_code(14, "down").retryable is True


def test_unknown_status_number_becomes_unknown_error_naming_the_number() -> None:
    error = error_from_code(99, "odd")
    assert type(error) is UnknownError
    assert "99" in error.details


def test_errors_are_also_the_matching_builtin_exceptions() -> None:
    assert isinstance(error_from_code(3, ""), ValueError)
    assert isinstance(error_from_code(4, ""), TimeoutError)
    assert isinstance(error_from_code(14, ""), ConnectionError)


def test_failed_rpc_maps_to_its_typed_error(scripted) -> None:
    async def main() -> None:
        async with AsyncClient(scripted.target) as client:
            with pytest.raises(InvalidArgumentError, match="scripted invalid"):
                await client.tokenize("invalid")

    asyncio.run(main())


def test_unreachable_server_raises_unavailable_after_retries() -> None:
    from tokenwire.client import RetryPolicy

    async def main() -> None:
        retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
        async with AsyncClient("127.0.0.1:1", retry=retry, timeout=5) as client:
            with pytest.raises(UnavailableError):
                await client.model_info()
            with pytest.raises(UnavailableError):
                await client.complete("count 1")

    asyncio.run(main())
