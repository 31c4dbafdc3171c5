"""The `tokenwire` command line against the scripted server: output formats and exit codes."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest

from tokenwire.client.cli import (
    EXIT_AUTH,
    EXIT_DEADLINE,
    EXIT_GENERATION_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SERVE_MISSING,
    build_parser,
    main,
)


def cli(*argv: str, stdin: str | None = None) -> tuple[int, str]:
    """Run the command; its exit status and standard output."""
    out = io.StringIO()
    code = main(list(argv), stdout=out, stdin=io.StringIO(stdin) if stdin is not None else None)
    return code, out.getvalue()


def test_generate_streams_text_and_ends_the_line(scripted) -> None:
    assert cli("generate", "count 3", "--target", scripted.target) == (EXIT_OK, "0 1 2 \n")


def test_generate_passes_sampling_flags(scripted) -> None:
    code, _ = cli(
        "generate", "count 1", "--target", scripted.target, "--max-tokens", "7", "--temperature", "0",
        "--top-p", "0.5", "--seed", "3", "--stop", "a", "--stop", "b", "--ignore-eos",
    )
    assert code == EXIT_OK
    (request,) = scripted.log.requests.values()
    assert (request.max_tokens, request.sampling.temperature, request.sampling.top_p) == (7, 0.0, 0.5)
    assert (request.sampling.seed, list(request.stop), request.ignore_eos) == (3, ["a", "b"], True)
    assert not request.sampling.HasField("top_k")


def test_generate_json_prints_one_object_per_chunk(scripted) -> None:
    code, out = cli("generate", "count 2", "--json", "--logprobs", "--target", scripted.target)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_OK
    assert [line["text"] for line in lines] == ["0 ", "1 ", ""]
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["usage"]["completion_tokens"] == 2
    assert lines[0]["logprobs"][0]["token_id"] == 0


def test_chat_and_stdin_prompts(scripted) -> None:
    assert cli("generate", "hello", "--chat", "--target", scripted.target) == (EXIT_OK, "hello\n")
    assert cli("generate", "--system", "be brief", "--target", scripted.target, stdin="from stdin")[1] == "from stdin\n"
    assert scripted.log.requests and [m.role for m in list(scripted.log.requests.values())[-1].chat.messages] == [
        "system", "user",
    ]
    assert cli("generate", "-", "--target", scripted.target, stdin="count 1") == (EXIT_OK, "0 \n")


def test_tokenize_info_health(scripted) -> None:
    assert cli("tokenize", "ab", "--target", scripted.target) == (EXIT_OK, "[97, 98]\n")
    code, out = cli("info", "--json", "--target", scripted.target)
    assert code == EXIT_OK and json.loads(out)["model_name"] == "scripted"
    code, out = cli("info", "--target", scripted.target)
    assert code == EXIT_OK and "kv_blocks_total" in out
    assert cli("health", "--target", scripted.target) == (EXIT_OK, "serving\n")
    assert cli("health", "--service", "nope", "--target", scripted.target) == (EXIT_UNAVAILABLE, "service_unknown\n")


@pytest.mark.parametrize(
    ("prompt", "expected"), [("error 3", EXIT_GENERATION_ERROR), ("error 16", EXIT_AUTH), ("error 7", EXIT_AUTH)]
)
def test_in_band_errors_set_the_exit_code(scripted, capsys, prompt: str, expected: int) -> None:
    code, out = cli("generate", prompt, "--json", "--target", scripted.target)
    assert code == expected
    assert "error" in json.loads(out.splitlines()[-1])
    assert "tokenwire generate:" in capsys.readouterr().err


def test_deadline_and_unreachable_exit_codes(scripted) -> None:
    code, out = cli("generate", "forever", "--timeout", "0.2", "--target", scripted.target)
    assert code == EXIT_DEADLINE and out.endswith("\n")
    assert cli("health", "--target", "127.0.0.1:1", "--timeout", "5")[0] == EXIT_UNAVAILABLE


def test_usage_errors_exit_2(capsys) -> None:
    assert cli("generate", "x", "--max-tokens", "many")[0] == EXIT_USAGE
    assert cli("generate", "x", "--target", "no-port")[0] == EXIT_USAGE
    assert cli("generate", "x", "--tls-ca", "/no/such/ca.pem")[0] == EXIT_USAGE
    assert cli("frobnicate")[0] == EXIT_USAGE
    assert cli()[0] == EXIT_USAGE
    capsys.readouterr()


def test_help_documents_exit_codes() -> None:
    text = build_parser().format_help()
    for line in ("0  success", "1  the request failed", "3  server unavailable", "4  unauthenticated", "5  deadline"):
        assert line in text


def test_serve_without_the_server_package_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['tokenwire.server.cli'] = None\n"
        "from tokenwire.client.cli import main\n"
        "sys.exit(main(['serve', '--port', '1']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert SERVE_MISSING in result.stderr


def test_serve_help_comes_from_the_server_package(capsys) -> None:
    assert cli("serve", "--help")[0] == EXIT_OK
    assert "--auth-token" in capsys.readouterr().out


def test_ctrl_c_cancels_the_generation_on_the_server_and_exits_130(scripted) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.client.cli", "generate", "forever", "--target", scripted.target],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.read(2) == "0 "  # it is streaming
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == EXIT_INTERRUPTED
    finally:
        process.kill()
        process.wait()
    (request_id,) = scripted.log.requests
    scripted.wait(lambda log: log.finished.get(request_id) == "cancelled")
    assert scripted.log.cancels == [request_id]
