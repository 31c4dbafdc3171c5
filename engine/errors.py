"""Typed engine errors; the server maps each to one gRPC status in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of errors the engine raises for one request."""


class InvalidRequestError(EngineError, ValueError):
    """A request's parameters or prompt are invalid (gRPC INVALID_ARGUMENT)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context length or the KV cache (gRPC INVALID_ARGUMENT)."""


class QueueFullError(EngineError):
    """The waiting queue is full (gRPC RESOURCE_EXHAUSTED)."""


class DuplicateRequestError(InvalidRequestError):
    """A request id is already in use among open requests (gRPC ALREADY_EXISTS)."""


class EngineDeadError(EngineError):
    """The engine loop stopped and can take no more work (gRPC UNAVAILABLE)."""


class ModelLoadError(Exception):
    """A model file or folder could not be loaded; the message names the path and the reason."""
