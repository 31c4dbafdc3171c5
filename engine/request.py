"""A generation request as the engine receives it, before tokenization."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tokenwire.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One request: exactly one of ``prompt`` (raw text), ``prompt_token_ids`` or ``messages`` (chat).

    ``request_id`` must be unique among the engine's open requests.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
