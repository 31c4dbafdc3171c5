"""SamplingParams validation: every bad value is refused up front with the parameter's name, never inside a step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from tokenwire.engine import InvalidRequestError, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"top_k": 5.0}, "top_k must be an integer"),
        ({"top_k": math.nan}, "top_k must be an integer"),
        ({"top_logprobs": 2.0}, "top_logprobs must be an integer"),
        ({"max_tokens": math.nan}, "max_tokens must be an integer"),
        ({"min_tokens": 1.5}, "min_tokens must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"temperature": "0.5"}, "temperature must be a number"),
        ({"temperature": math.nan}, "temperature must be in"),
        ({"top_p": math.inf}, "top_p must be in"),
        ({"repetition_penalty": 1e-38}, "repetition_penalty must be in \\[0.01, 10\\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in"),
        ({"presence_penalty": math.nan}, "presence_penalty must be in"),
        ({"stop_token_ids": [3.0]}, "stop_token_ids must be an integer"),
        ({"stop_token_ids": list(range(257))}, "at most 256 stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"stop": [7]}, "stop strings must be strings"),
        ({"stop": [""]}, "stop strings must be 1 to"),
        ({"max_tokens": 2, "min_tokens": 3}, "min_tokens \\(3\\) must not exceed max_tokens \\(2\\)"),
    ],
)
def test_bad_values_are_refused_naming_the_parameter(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(**kwargs)


def test_integers_and_reals_of_any_kind_are_taken_and_normalised() -> None:
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(4), max_tokens=7, seed=2**64 - 1, repetition_penalty=1)
    assert (p.temperature, p.top_k, p.repetition_penalty) == (0.5, 4, 1.0)
    assert type(p.temperature) is float and type(p.top_k) is int
    assert SamplingParams(repetition_penalty=0.01).repetition_penalty == 0.01  # the floor itself is allowed


def test_one_stop_string_is_one_stop_string() -> None:
    assert SamplingParams(stop="END\n").stop == ("END\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
