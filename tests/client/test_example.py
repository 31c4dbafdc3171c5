"""examples/rag_sidecar.py: retrieval, prompt building, and the streamed answer (scripted server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rag_sidecar.py"


def test_rag_sidecar_retrieves_the_best_passages_and_streams_the_answer(scripted) -> None:
    env = {**os.environ, "TOKENWIRE_TOKEN": "sidecar-token"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", scripted.target, "What happens to KV blocks when cancelling a request?"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )
    passages = [line for line in result.stdout.splitlines() if line.startswith("[passage ")]
    assert len(passages) == 2 and "frees its KV blocks" in passages[0]
    # The scripted server echoes the last chat message: the prompt built from those passages.
    (request,) = scripted.log.requests.values()
    system, user = request.chat.messages
    assert system.role == "system" and user.role == "user"
    assert "Passage 1: Cancelling a request" in user.content
    assert user.content.endswith("Question: What happens to KV blocks when cancelling a request?")
    assert "Answer: Passage 1:" in result.stdout
    assert scripted.log.metadata[-1]["authorization"] == "Bearer sidecar-token"
