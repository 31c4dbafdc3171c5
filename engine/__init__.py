"""tokenwire's engine: models, loaders, tokenizer, paged KV cache, scheduler, sampler and the engine loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenwire.engine.config import EngineArgs
from tokenwire.engine.errors import (
    DuplicateRequestError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    QueueFullError,
)
from tokenwire.engine.info import EngineStats, ModelInfo
from tokenwire.engine.outputs import Completion, FinishReason, RequestOutput, TokenLogprob, Usage
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenwire.engine.async_engine import AsyncEngine
    from tokenwire.engine.llm import LLM

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineArgs",
    "GenerationRequest",
    "SamplingParams",
    "Completion",
    "RequestOutput",
    "FinishReason",
    "TokenLogprob",
    "Usage",
    "ModelInfo",
    "EngineStats",
    "EngineError",
    "InvalidRequestError",
    "PromptTooLongError",
    "QueueFullError",
    "DuplicateRequestError",
    "EngineDeadError",
    "ModelLoadError",
]


def __getattr__(name: str) -> Any:
    # NOTE: LLM and AsyncEngine pull in torch and the models; import them only when asked for, so
    # `tokenwire.engine.SamplingParams` stays cheap.
    if name == "LLM":
        from tokenwire.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from tokenwire.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'tokenwire.engine' has no attribute {name!r}")
