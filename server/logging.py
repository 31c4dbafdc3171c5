"""Structured logs with structlog: JSON off a terminal, console on one; one line per finished request."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from tokenwire.engine.outputs import Usage

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog up process-wide (called once by the CLI, never at import time).

    Args:
        log_format: "json", "console", or "auto" (JSON unless the stream is a terminal).
        level: "debug", "info", "warning" or "error".
        stream: where lines go; stderr by default.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if log_format not in ("auto", "json", "console"):
        raise ValueError(f"log_format must be auto, json or console, got {log_format!r}")
    out = sys.stderr if stream is None else stream
    as_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # NOTE: grpc and other libraries log through the standard library; keep their warnings.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=out)


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(name, component=name)


class RequestLog:
    """Writes the one line per finished request.

    Args:
        log_content: also log the prompt and the generated text (off by default: they may be private).
    """

    def __init__(self, log_content: bool = False) -> None:
        self.log_content = log_content
        self._logger = get_logger("tokenwire.requests")

    def finished(
        self,
        *,
        request_id: str,
        stream_id: str,
        peer: str,
        finish_reason: str,
        usage: Usage | None,
        ttft: float | None,
        duration: float,
        error_code: str | None = None,
        error_message: str | None = None,
        prompt: object = None,
        output: str | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Log one finished request (prompt and output only when ``log_content`` is on).

        ``completion_tokens`` is the count logged when there is no ``usage`` (a request cut off by
        its client's disconnect: the tokens sent so far; its prompt size is then unknown, null).
        """
        fields: dict[str, Any] = {
            "request_id": request_id,
            "stream_id": stream_id,
            "peer": peer,
            "finish_reason": finish_reason,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "completion_tokens": usage.completion_tokens if usage is not None else completion_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens if usage is not None else None,
            "ttft_s": None if ttft is None else round(ttft, 4),
            "duration_s": round(duration, 4),
        }
        if error_code is not None:
            fields["error_code"] = error_code
            fields["error"] = error_message
        if self.log_content:
            fields["prompt"] = prompt
            fields["output"] = output
        self._logger.info("request finished", **fields)
