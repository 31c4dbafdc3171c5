"""The `tokenwire` command line: generate, tokenize, info and health against a server; serve (server extra)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from tokenwire.client.config import TLSConfig
from tokenwire.client.errors import (
    ClientClosedError,
    DeadlineExceededError,
    PermissionDeniedError,
    TokenwireError,
    UnauthenticatedError,
    UnavailableError,
)
from tokenwire.client.sync import Client
from tokenwire.client.types import ChatMessage, GenerationChunk, HealthStatus

EXIT_OK = 0
EXIT_GENERATION_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_AUTH = 4
EXIT_DEADLINE = 5
EXIT_INTERRUPTED = 130
DEFAULT_TARGET = "127.0.0.1:50051"
SERVE_MISSING = "tokenwire serve needs the server extra: pip install 'tokenwire[server]'"

EPILOG = f"""\
exit codes:
  {EXIT_OK}  success (health: the server is SERVING)
  {EXIT_GENERATION_ERROR}  the request failed (an in-band error: invalid argument, overloaded, internal, ...)
  {EXIT_USAGE}  usage error (bad flags or arguments)
  {EXIT_UNAVAILABLE}  server unavailable or unreachable (health: not serving)
  {EXIT_AUTH}  unauthenticated or permission denied (missing or wrong --token / certificate)
  {EXIT_DEADLINE}  deadline exceeded (--timeout)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); an open generation is cancelled on the server

environment: TOKENWIRE_TARGET and TOKENWIRE_TOKEN give defaults for --target and --token.
"""


def exit_code(error: TokenwireError) -> int:
    """The exit status for a failed call (see the epilog of `tokenwire --help`)."""
    if isinstance(error, (UnavailableError, ClientClosedError)):
        return EXIT_UNAVAILABLE
    if isinstance(error, (UnauthenticatedError, PermissionDeniedError)):
        return EXIT_AUTH
    if isinstance(error, DeadlineExceededError):
        return EXIT_DEADLINE
    return EXIT_GENERATION_ERROR


def _connection_flags() -> argparse.ArgumentParser:
    """Flags every client command shares: where to connect and how."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--target", action="append", metavar="TARGET",
        help="server: host:port, unix:PATH, dns:///name:port; repeat for replicas "
        f"[env TOKENWIRE_TARGET; default {DEFAULT_TARGET}]",
    )
    group.add_argument("--token", help="bearer token [env TOKENWIRE_TOKEN]")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of each call (default: none)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    group.add_argument("--tls-ca", metavar="PATH", help="PEM CA that signed the server's certificate (implies --tls)")
    group.add_argument("--tls-cert", metavar="PATH", help="PEM client certificate for mutual TLS (implies --tls)")
    group.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
    group.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the server's certificate")
    return parent


def _prompt_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or none reads standard input")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--system", metavar="TEXT", help="a system message before the prompt (implies --chat)")


def _generate_flags(parser: argparse.ArgumentParser) -> None:
    _prompt_flags(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    sampling.add_argument("--min-tokens", type=int, metavar="N", help="fewest tokens before a stop may end it")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (server default 1.0)")
    sampling.add_argument("--top-k", type=int, metavar="K")
    sampling.add_argument("--top-p", type=float, metavar="P")
    sampling.add_argument("--min-p", type=float, metavar="P")
    sampling.add_argument("--repetition-penalty", type=float, metavar="X")
    sampling.add_argument("--presence-penalty", type=float, metavar="X")
    sampling.add_argument("--frequency-penalty", type=float, metavar="X")
    sampling.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None, help="go on past end-of-sequence")
    sampling.add_argument("--logprobs", action="store_true", default=None, help="log probabilities (with --json)")
    sampling.add_argument("--top-logprobs", type=int, metavar="N", help="best alternatives per token (with --json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per chunk instead of text")


def build_parser() -> argparse.ArgumentParser:
    """The `tokenwire` argument parser (the `serve` flags are added only when serve is chosen)."""
    parser = argparse.ArgumentParser(
        prog="tokenwire",
        description="Talk to a tokenwire server: stream a generation, tokenize, describe the model, check health.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    connection = [_connection_flags()]
    generate = commands.add_parser(
        "generate", parents=connection, help="stream a completion to standard output", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _generate_flags(generate)
    tokenize = commands.add_parser("tokenize", parents=connection, help="print the prompt's token ids as JSON")
    _prompt_flags(tokenize)
    info = commands.add_parser("info", parents=connection, help="describe the served model and engine")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    health = commands.add_parser("health", parents=connection, help="standard gRPC health check (exit 0 if serving)")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    commands.add_parser("serve", help="run a server (needs the server extra)", add_help=False)
    return parser


def _read_prompt(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.prompt != "-":
        return str(args.prompt)
    if stdin.isatty():
        raise ValueError("give a prompt, or pipe one on standard input")
    return stdin.read()


def _messages(args: argparse.Namespace, prompt: str) -> list[ChatMessage] | None:
    if not (args.chat or args.system):
        return None
    system = [ChatMessage("system", args.system)] if args.system else []
    return [*system, ChatMessage("user", prompt)]


def _client(args: argparse.Namespace) -> Client:
    targets = args.target or [os.environ.get("TOKENWIRE_TARGET") or DEFAULT_TARGET]
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TLSConfig(
            ca_cert=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key, server_name=args.tls_server_name
        )
    elif args.tls_key:
        raise ValueError("--tls-key needs --tls-cert")
    token = args.token if args.token is not None else os.environ.get("TOKENWIRE_TOKEN") or None
    return Client(targets, token=token, tls=tls, timeout=args.timeout)


def _chunk_json(chunk: GenerationChunk) -> str:
    data = dataclasses.asdict(chunk)
    data["finish_reason"] = chunk.finish_reason.value if chunk.finish_reason is not None else None
    return json.dumps(data, ensure_ascii=False)


_SAMPLING_FLAGS = (
    "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos", "logprobs", "top_logprobs",
)


def _generate(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    prompt = _read_prompt(args, stdin)
    messages = _messages(args, prompt)
    sampling: dict[str, Any] = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None}
    generation = client.generate(None if messages else prompt, messages=messages, **sampling)
    ended_with_newline = True
    try:
        with generation:
            for chunk in generation:
                if args.json:
                    out.write(_chunk_json(chunk) + "\n")
                elif chunk.text:
                    out.write(chunk.text)
                    ended_with_newline = chunk.text.endswith("\n")
                out.flush()
    finally:
        # NOTE: end the line even on failure, so an error message starts on a line of its own.
        if not ended_with_newline:
            out.write("\n")
            out.flush()
    return EXIT_OK


def _tokenize(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    prompt = _read_prompt(args, stdin)
    messages = _messages(args, prompt)
    out.write(json.dumps(client.tokenize(None if messages else prompt, messages=messages)) + "\n")
    return EXIT_OK


def _info(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    info = dataclasses.asdict(client.model_info())
    if args.json:
        out.write(json.dumps(info) + "\n")
    else:
        width = max(map(len, info))
        for key, value in info.items():
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            out.write(f"{key:<{width}}  {shown}\n")
    return EXIT_OK


def _health(client: Client, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    status = client.health(args.service)
    out.write(status.value + "\n")
    return EXIT_OK if status is HealthStatus.SERVING else EXIT_UNAVAILABLE


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, TextIO, TextIO], int]] = {
    "generate": _generate,
    "tokenize": _tokenize,
    "info": _info,
    "health": _health,
}


def _serve(argv: Sequence[str]) -> int:
    """Run `tokenwire serve` from the server package, which a client-only install lacks."""
    try:
        from tokenwire.server.cli import add_serve_arguments, run_serve
    except ImportError:
        print(SERVE_MISSING, file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog="tokenwire serve", description="Serve a language model over gRPC.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """Run the `tokenwire` command.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` by default.
        stdout: where results go; `sys.stdout` by default.
        stdin: where a '-' prompt is read from; `sys.stdin` by default.

    Returns:
        The exit status (documented in `tokenwire --help`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out = stdout if stdout is not None else sys.stdout
    source = stdin if stdin is not None else sys.stdin
    if argv[:1] == ["serve"]:
        # NOTE: only `serve` may import the server package (torch and all); client commands and
        # `tokenwire --help` must work on a client-only install.
        try:
            return _serve(argv[1:])
        except SystemExit as exc:  # argparse's --help and usage errors
            return int(exc.code or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        with _client(args) as client:
            return _COMMANDS[args.command](client, args, out, source)
    except TokenwireError as error:
        code = exit_code(error)
        if getattr(args, "json", False):
            out.write(json.dumps({"error": {"code": error.code.name, "message": error.details}}) + "\n")
        print(f"tokenwire {args.command}: {error}", file=sys.stderr)
        return code
    except (ValueError, TypeError) as error:
        print(f"tokenwire {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tokenwire {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
